"""The message as ``monomail sendmail`` submits it: read, normalized, headers completed.

Job: read standard input (up to EOF, or a lone ``.`` without ``-i``); bare LF, CRLF or
CR line endings become LF, a leading mbox ``From `` line is dropped; ``Bcc`` and
``Resent-Bcc`` are removed, ``From``, ``Date`` and ``Message-ID`` are added when
missing (RFC 5322 §3.6), a line longer than 998 octets is broken by inserting a newline
and a space (as Postfix's SMTP client does, never inside a UTF-8 character); with
``-t`` the recipients are taken from To/Cc/Bcc (Resent-To/Cc/Bcc when the message has
Resent- fields). A bare local part in an address field (From, To, Cc, Reply-To, Sender
and their Resent- forms) gets ``local.primary_domain`` in place, comments and display
names kept (Postfix's ``append_at_myorigin``). Also: our Received field for a local submission (RFC 5321 §4.4), and
addresses as monomail writes them. The header section is split by
``message.split_header``, the one splitter.

Not here: flags (``options``), handing the message over (``handover``).
"""

from __future__ import annotations

import email.utils
import os
import pwd
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from ..envelope import Address, parse_path
from ..errors import BAD_ADDRESS, AddressError, ReplyError, UsageError
from ..message import MAX_LINE, header_fields, split_header

_LONG_LINE = re.compile(rb"[^\n]{%d}" % (MAX_LINE + 1))


def read_message(stream: BinaryIO, ignore_dots: bool) -> bytes:
    """Standard input up to EOF, or (without -i) up to a line holding a single '.'."""
    if ignore_dots:
        return stream.read()
    lines = []
    for line in iter(stream.readline, b""):
        if line in (b".\n", b".\r\n", b"."):
            break
        lines.append(line)
    return b"".join(lines)


def normalize(data: bytes) -> bytes:
    """CRLF, CR or LF line endings → LF; a final newline; a leading mbox From_ line dropped."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if data.startswith(b"From "):
        end = data.find(b"\n")
        data = b"" if end < 0 else data[end + 1 :]
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data


def _name(header_field: bytes) -> str:
    return header_field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def _value(header_field: bytes) -> str:
    raw = header_field.split(b":", 1)[1]
    return raw.decode("utf-8", "replace").replace("\n", "")


def header_recipients(fields: Sequence[bytes]) -> list[str]:
    """Addresses of To/Cc/Bcc, or of Resent-To/Cc/Bcc when the message was resent (-t)."""
    names = {_name(f) for f in fields}
    resent = {"resent-to", "resent-cc", "resent-bcc"}
    wanted = resent if names & resent else {"to", "cc", "bcc"}
    values = [_value(f) for f in fields if _name(f) in wanted]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def wrap_long_lines(data: bytes) -> bytes:
    """Break lines over 998 octets by inserting LF + space (never inside a UTF-8 character)."""
    if len(data) <= MAX_LINE or not _LONG_LINE.search(data):
        return data
    out = []
    for line in data.split(b"\n"):
        while len(line) > MAX_LINE:
            cut = MAX_LINE
            while cut > MAX_LINE - 4 and 0x80 <= line[cut] < 0xC0:
                cut -= 1
            out.append(line[:cut])
            line = b" " + line[cut:]
        out.append(line)
    return b"\n".join(out)


@dataclass(frozen=True)
class Prepared:
    data: bytes  # LF line endings, headers completed, Bcc removed
    recipients: tuple[str, ...]  # from the header fields (when asked for)


ADDRESS_FIELDS = frozenset({"from", "to", "cc", "reply-to", "sender", "resent-from", "resent-to", "resent-cc",
                            "resent-sender"})


def _top_level_split(value: str) -> list[str]:
    """An address list split at its commas (not those in quotes, comments or <...>)."""
    parts, start, depth, quoted, angle, i = [], 0, 0, False, False, 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            i += 2
            continue
        if quoted:
            quoted = ch != '"'
        elif ch == '"' and not depth:
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth and ch in "<>":
            angle = ch == "<"
        elif ch == "," and not depth and not angle:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    parts.append(value[start:])
    return parts


def _without_comments(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and depth:
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
        i += 1
    return "".join(out)


_ANGLE_LOCAL = re.compile(r"<\s*([^\s<>@\"(),:;\\]+)\s*>")
_BARE_WORD = re.compile(r"[^\s<>@\"(),:;\\\[\]]+\Z")


def _qualify_one(part: str, domain: str) -> str:
    if "<" in part:  # display name <addr>: the first angle address without a domain
        return _ANGLE_LOCAL.sub(lambda m: f"<{m.group(1)}@{domain}>", part, count=1)
    word = _without_comments(part).strip()
    if not _BARE_WORD.match(word):  # already qualified, a group, a quoted word: as it is
        return part
    at = part.find(word)
    return part if at < 0 else f"{part[:at + len(word)]}@{domain}{part[at + len(word):]}"


def qualify_field(header_field: bytes, domain: str) -> bytes:
    """One address field with every bare local part qualified with ``domain``, else as given."""
    name, _, raw = header_field.partition(b":")
    value = raw.decode("utf-8", "surrogateescape")
    parts = _top_level_split(value)
    qualified = [_qualify_one(p, domain) for p in parts]
    if qualified == parts:
        return header_field
    return name + b":" + ",".join(qualified).encode("utf-8", "surrogateescape")


def prepare(raw: bytes, *, from_address: str, full_name: str, hostname: str, extract: bool,
            now: float | None = None, domain: str = "") -> Prepared:
    """The message as it is submitted: Bcc/Resent-Bcc removed, bare local parts in address
    fields qualified with ``domain`` (when given), From/Date/Message-ID added when missing,
    long lines broken. ``raw`` is already `normalize`d."""
    section, body = split_header(raw)
    fields = header_fields(section)
    found = header_recipients(fields) if extract else []
    kept = [f for f in fields if _name(f) not in ("bcc", "resent-bcc")]
    if domain:
        kept = [qualify_field(f, domain) if _name(f) in ADDRESS_FIELDS else f for f in kept]
    names = {_name(f) for f in kept}
    added = []
    if "from" not in names:
        added.append(b"From: " + _from_value(full_name, from_address).encode("utf-8") + b"\n")
    if "date" not in names:
        added.append(f"Date: {email.utils.formatdate(now, localtime=True)}\n".encode())
    if "message-id" not in names:
        added.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}\n".encode())
    data = b"".join(kept) + b"".join(added) + b"\n" + body
    return Prepared(wrap_long_lines(data), tuple(found))


def _from_value(name: str, address: str) -> str:
    name = " ".join(name.split())  # one line, whatever -F or the GECOS field held
    if not name:
        return address
    try:
        return email.utils.formataddr((name, address))
    except UnicodeError:  # a non-ASCII address: no display name then
        return address


def received_field(hostname: str, uid: int, when: float, queue_id: str | None = None) -> bytes:
    """Our trace field for a local submission (RFC 5321 §4.4)."""
    text = f"Received: by {hostname} (monomail sendmail, from userid {uid})"
    if queue_id:
        text += f"\n\twith local id {queue_id}"
    return f"{text}; {email.utils.formatdate(when, localtime=True)}\n".encode()


# -- addresses --------------------------------------------------------------------------


def canonical(address: str, primary_domain: str) -> str:
    """One address as monomail writes it (``local@domain``, domain lower-case; a bare
    local part gets the primary domain). Raises `AddressError` (with its reply)."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    parsed, params = parse_path(f"<{text}>", smtputf8=True)
    if parsed is None or params:
        raise AddressError(BAD_ADDRESS, f"bad address {address!r}")
    return str(Address(parsed.local, parsed.domain or primary_domain, parsed.quoted))


def argument_addresses(arg: str) -> list[str]:
    """The addresses in one command-line argument: one plain address, or a list in
    header syntax (``a@x, B <b@y>``)."""
    if not any(c in arg for c in ',<("'):
        return [arg.strip()] if arg.strip() else []
    return [addr for _, addr in email.utils.getaddresses([arg]) if addr]


def login() -> tuple[str, str]:
    """The caller's login name and full name (the GECOS field's first part)."""
    try:
        pw = pwd.getpwuid(os.getuid())
    except KeyError:
        return os.environ.get("LOGNAME") or os.environ.get("USER") or f"uid{os.getuid()}", ""
    return pw.pw_name, pw.pw_gecos.split(",", 1)[0].strip()


def envelope_sender(given: str | None, login_name: str, primary_domain: str) -> str:
    """``-f`` as given (``''``/``<>``: the null sender), else login@primary_domain."""
    if given is None:
        try:
            return canonical(login_name, primary_domain)
        except ReplyError:
            return f"nobody@{primary_domain}"
    if given.strip() in ("", "<>"):
        return ""
    try:
        return canonical(given, primary_domain)
    except ReplyError as exc:
        raise UsageError(f"bad sender address {given!r}: {exc.reply}") from None
