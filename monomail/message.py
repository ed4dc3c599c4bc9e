"""The message as bytes: checking what arrived in DATA, and the trace headers we add.

Job: pure functions over raw message bytes.

- `canonicalize` checks DATA content as aiosmtpd hands it over (dot-stuffing already
  removed, CRLF line endings) and returns it with LF endings, the form monomail stores
  and spools. It *rejects*, never repairs (DESIGN invariant 5): a bare CR or LF (the SMTP
  smuggling family, CVE-2023-51764), a NUL byte, or a line longer than 998 characters
  (RFC 5322 §2.1.1) raises `ReplyError` with a 5xx.
- `received_header` builds our ``Received:`` field (RFC 5321 §4.4); client-supplied
  words (the HELO name) are reduced to a safe alphabet before they reach a header.
- `split_header` is the one header-section splitter (``header_fields`` lists its fields).
- `count_received` feeds the loop guard (RFC 5321 §6.3).
- `delivery_headers` gives ``Return-Path`` (RFC 5321 §4.4) and ``Delivered-To`` for a
  final delivery.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from email.utils import format_datetime

from .errors import Reply, ReplyError

MAX_LINE = 998

BARE_CR_LF = Reply(554, "5.6.0", "Message contains a bare CR or LF; lines must end in CRLF")
NUL_BYTE = Reply(554, "5.6.0", "Message contains a NUL byte")
LINE_TOO_LONG = Reply(554, "5.6.0", "Message has a line longer than 998 characters")
LOOP = Reply(554, "5.4.6", "Too many Received headers: mail loop suspected")

_RECEIVED = re.compile(rb"^Received:", re.IGNORECASE | re.MULTILINE)
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")
_LONG_LINE = re.compile(rb"[^\n]{%d}" % (MAX_LINE + 1))


def canonicalize(content: bytes) -> bytes:
    """Check raw DATA content (CRLF endings) and return it with LF endings."""
    if b"\x00" in content:
        raise ReplyError(NUL_BYTE)
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        raise ReplyError(BARE_CR_LF)
    data = content.replace(b"\r\n", b"\n")
    if len(data) > MAX_LINE and _LONG_LINE.search(data):
        raise ReplyError(LINE_TOO_LONG)
    return data


_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 §2.2 field name, then ":"


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header section, body) of an LF-ended message: the one header-section splitter.

    The header section is every field with its continuation lines, each ending in LF. It
    ends at the first empty line, which belongs to neither part, or at the first line that
    is neither a field nor a continuation, which starts the body (RFC 5322 §2.1, §2.2.3).
    """
    pos, size = 0, len(data)
    while pos < size:
        end = data.find(b"\n", pos)
        stop = size if end < 0 else end + 1
        if stop - pos == 1 and data[pos] == 0x0A:  # the empty line
            return data[:pos], data[stop:]
        first = data[pos : pos + 1]
        if not (first in (b" ", b"\t") and pos > 0) and not _FIELD.match(data, pos, stop):
            break
        pos = stop
    return data[:pos], data[pos:]


def header_fields(section: bytes) -> list[bytes]:
    """The fields of a header section (from `split_header`), each with its continuation lines."""
    fields: list[bytes] = []
    for line in section.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def header_block(data: bytes) -> bytes:
    """The header section of an LF-ended message (`split_header`'s first part)."""
    return split_header(data)[0]


def count_received(data: bytes) -> int:
    return len(_RECEIVED.findall(header_block(data)))


def safe_word(text: str, limit: int = 128) -> str:
    """A client-supplied word (HELO name) made safe for a header comment."""
    return _HELO_SAFE.sub("_", text)[:limit] or "unknown"


def received_header(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    when: float,
) -> bytes:
    """``Received: from helo ([ip]) by host (monomail) with ESMTP id QID for <rcpt>; date``."""
    ip = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    stamp = _date(int(when))
    text = (
        f"Received: from {safe_word(helo)} ([{ip}])\n"
        f"\tby {hostname} (monomail) with {protocol} id {queue_id}"
    )
    if recipient:
        text += f"\n\tfor <{recipient}>"
    return (text + f"; {stamp}\n").encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date in local time; cached, as every message of one second shares it."""
    return format_datetime(datetime.fromtimestamp(second, UTC).astimezone())


def delivery_headers(sender: str, delivered_to: str) -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {delivered_to}\n".encode("utf-8", "surrogateescape")

