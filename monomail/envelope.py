"""Addresses, envelopes and delivery outcomes: the values that travel through monomail.

Job: parse the path of an SMTP ``MAIL FROM:`` / ``RCPT TO:`` command (RFC 5321 §4.1.2,
with RFC 6531 for UTF-8 addresses) into an `Address`, and define the immutable values
the engines pass around (`Envelope`, `Outcome`).

Security stance: parsing is strict about what can smuggle. Invalid UTF-8, control
characters, NUL, CR and LF are refused. Source routes (``<@a,@b:user@c>``) are parsed
and *recorded* but routing ignores them (RFC 5321 §3.6.1 allows ignoring them); a
quoted local part is unquoted and marked, so the router can refuse local parts that
smuggle another address (``"x@other"@us``, ``x%other@us``, ``other!x@us``).

Not here: deciding what to do with an address (``router``, ``policy``).

This module imports only ``errors``.
"""

from __future__ import annotations

import enum
import itertools
import os
import re
import time
from dataclasses import dataclass

from .errors import AddressError, Reply

# RFC 5321 §4.1.2 / RFC 5322 §3.2.3 atext, plus "." for dot-strings (leniently: no
# check for empty atoms, as Postfix accepts "a..b"). Non-ASCII is allowed only under
# SMTPUTF8 and checked separately.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\x80-\U0010ffff]+\Z")
_QTEXT_PAIR = re.compile(r'(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*\Z')
_LABEL = re.compile(r"[A-Za-z0-9_\x80-\U0010ffff](?:[A-Za-z0-9_\-\x80-\U0010ffff]*"
                    r"[A-Za-z0-9_\x80-\U0010ffff])?\Z")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, octets including the angle brackets
MAX_LOCAL_PART = 64  # §4.5.3.1.1
MAX_DOMAIN = 255  # §4.5.3.1.2

_BAD_SYNTAX = Reply(553, "5.1.3", "Bad address syntax")
_BAD_UTF8 = Reply(553, "5.1.3", "Address is not valid UTF-8")
_NEEDS_UTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
_TOO_LONG = Reply(553, "5.1.3", "Address too long")
_PARAM_SYNTAX = Reply(501, "5.5.4", "Bad parameter syntax")
_NO_PATH = Reply(501, "5.5.4", "Syntax: an address in angle brackets is required (<> for none)")


@dataclass(frozen=True, slots=True)
class Address:
    """``local@domain``. ``local`` is unquoted and keeps its case; ``domain`` is lower-case
    (or empty when a client gave a bare local part such as ``<postmaster>``)."""

    local: str
    domain: str
    quoted: bool = False
    route: tuple[str, ...] = ()

    def __str__(self) -> str:
        local = self.local
        if not _ATEXT.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}" if self.domain else local

    @classmethod
    def from_str(cls, text: str) -> Address:
        """Split an address that monomail itself wrote (spool, config): no validation."""
        local, _, domain = text.rpartition("@")
        if not _:
            return cls(text, "")
        if local.startswith('"') and local.endswith('"') and len(local) >= 2:
            return cls(re.sub(r"\\(.)", r"\1", local[1:-1]), domain.lower(), quoted=True)
        return cls(local, domain.lower())

    @property
    def ascii_only(self) -> bool:
        return self.local.isascii() and self.domain.isascii()


def _check_text(text: str, smtputf8: bool) -> None:
    if _SURROGATE.search(text):
        raise AddressError(_BAD_UTF8, f"invalid UTF-8 in {text!r}")
    if _CONTROL.search(text):
        raise AddressError(_BAD_SYNTAX, f"control character in {text!r}")
    if not smtputf8 and not text.isascii():
        raise AddressError(_NEEDS_UTF8, f"non-ASCII without SMTPUTF8: {text!r}")


def _parse_domain(domain: str) -> str:
    if not domain or len(domain.encode("utf-8", "surrogateescape")) > MAX_DOMAIN:
        raise AddressError(_BAD_SYNTAX, f"bad domain {domain!r}")
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if not re.fullmatch(r"[0-9.]+|IPv6:[0-9A-Fa-f:.]+", literal):
            raise AddressError(_BAD_SYNTAX, f"bad address literal {domain!r}")
        return domain
    labels = (domain[:-1] if domain.endswith(".") else domain).split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise AddressError(_BAD_SYNTAX, f"bad domain {domain!r}")
    return ".".join(labels).lower()


def _split_mailbox(mailbox: str) -> tuple[str, str, bool]:
    """``local@domain`` → (unquoted local, domain, quoted?)."""
    if mailbox.startswith('"'):
        end = 1
        while end < len(mailbox):
            ch = mailbox[end]
            if ch == "\\":
                end += 2
                continue
            if ch == '"':
                break
            end += 1
        else:
            raise AddressError(_BAD_SYNTAX, f"unterminated quoted string in {mailbox!r}")
        quoted_text = mailbox[1:end]
        rest = mailbox[end + 1 :]
        if not _QTEXT_PAIR.match(quoted_text):
            raise AddressError(_BAD_SYNTAX, f"bad quoted local part in {mailbox!r}")
        local = re.sub(r"\\(.)", r"\1", quoted_text)
        if rest and not rest.startswith("@"):
            raise AddressError(_BAD_SYNTAX, f"junk after quoted local part in {mailbox!r}")
        return local, rest[1:] if rest else "", True
    local, at, domain = mailbox.rpartition("@")
    if not at:
        local, domain = mailbox, ""
    elif not local:
        raise AddressError(_BAD_SYNTAX, f"empty local part in {mailbox!r}")
    if not _ATEXT.match(local):
        raise AddressError(_BAD_SYNTAX, f"bad local part in {mailbox!r}")
    return local, domain, False


def parse_path(arg: str, *, smtputf8: bool = True) -> tuple[Address | None, dict[str, str | None]]:
    """Parse what follows ``FROM:`` / ``TO:``: a path and its ESMTP parameters.

    Returns ``(None, params)`` for the null path ``<>``. Raises `AddressError` with the
    reply to send. A bare address without angle brackets is accepted, as Postfix does.
    """
    _check_text(arg, True)
    arg = arg.strip(" ")
    if not arg:
        raise AddressError(_NO_PATH, "empty path")
    if arg.startswith("<"):
        end = arg.find(">")
        if end < 0:
            raise AddressError(_BAD_SYNTAX, "missing '>'")
        # A quoted local part may contain '>'; find the closing bracket after quotes.
        if '"' in arg[:end]:
            m = re.match(r'<((?:@[^:,<>]+(?:,@[^:,<>]+)*:)?"(?:[^"\\]|\\.)*"@[^<>\s]*)>', arg)
            if not m:
                raise AddressError(_BAD_SYNTAX, "bad quoted address")
            end = m.end() - 1
        path, rest = arg[1:end], arg[end + 1 :]
    else:
        path, _, rest = arg.partition(" ")
    if len(path.encode("utf-8", "surrogateescape")) + 2 > MAX_PATH:
        raise AddressError(_TOO_LONG, "path longer than 256 octets")
    params = _parse_params(rest)
    if path == "":
        return None, params
    smtputf8 = smtputf8 or "SMTPUTF8" in params
    _check_text(path, smtputf8)
    route: tuple[str, ...] = ()
    if path.startswith("@"):
        hops, colon, path = path.partition(":")
        if not colon or not path:
            raise AddressError(_BAD_SYNTAX, "bad source route")
        route = tuple(_parse_domain(h.lstrip("@")) for h in hops.split(","))
    local, domain, quoted = _split_mailbox(path)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError(_TOO_LONG, "local part longer than 64 octets")
    if domain or "@" in path[len(local):]:
        domain = _parse_domain(domain)
    return Address(local, domain, quoted, route), params


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _PARAM_KEY.match(key) or (eq and not value):
            raise AddressError(_PARAM_SYNTAX, f"bad parameter {word!r}")
        params[key.upper()] = value if eq else None
    return params


class Status(enum.Enum):
    """What one delivery attempt for one recipient came to."""

    DELIVERED = "delivered"
    TEMPORARY = "deferred"
    PERMANENT = "failed"


@dataclass(frozen=True, slots=True)
class Spawn:
    """A new message a delivery produced: the queue journals it before the recipient that
    produced it counts as delivered (a mailing list post to its members)."""

    sender: str
    recipients: tuple[str, ...]
    prefix: bytes  # header lines to put on top of the original message
    data: bytes | None = None  # the whole new message, when it is not the original (filtered)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result for one recipient. ``reply`` is what a DSN or an SMTP client may see;
    ``detail`` is for the log only."""

    recipient: str
    status: Status
    reply: Reply
    detail: str = ""
    finished: tuple[str, ...] = ()  # destination keys delivered (kept across retries)
    remote_host: str = ""  # the remote MTA that answered, for DSNs
    spawned: tuple[Spawn, ...] = ()  # new messages this delivery made (list posts)

    @property
    def done(self) -> bool:
        return self.status is not Status.TEMPORARY


@dataclass(frozen=True, slots=True)
class Envelope:
    """An accepted message's envelope. ``sender`` is ``""`` for the null path."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    received_at: float
    smtputf8: bool = False
    size: int = 0


_seq = itertools.count()


def new_id(now: float | None = None) -> str:
    """A queue id: sortable by time, unique within this host (time, pid, counter)."""
    t = int((time.time() if now is None else now) * 1_000_000)
    return f"{t:013x}{os.getpid() & 0xFFFF:04x}{next(_seq) & 0xFFFF:04x}"
