"""The message as bytes: checking what arrived in DATA, and the trace headers we add.

Job: pure code over raw message bytes (no I/O).

- `Content` checks DATA content as it is read (RFC 5321 §4.5.2 dot-stuffing removed,
  CRLF line endings) and gives it with LF endings, the form monomail stores and spools.
  It *rejects*, never repairs (DESIGN invariant 5): a bare CR or LF (the SMTP smuggling
  family, CVE-2023-51764), a NUL byte, a line longer than 998 characters (RFC 5322
  §2.1.1) or more than the size limit (RFC 1870) is refused with a 5xx. It also counts
  the Received fields of the header section for the loop guard (RFC 5321 §6.3). The work
  is done per block of complete lines with bytes methods (C speed), so what a caller
  does per feed is bounded whatever the message's size (DESIGN invariant 9); only the
  final `Content.join` is proportional to the size, and the SMTP face runs it in a
  worker thread.
- `received_header` builds our ``Received:`` field (RFC 5321 §4.4); client-supplied
  words (the HELO name) are reduced to a safe alphabet before they reach a header.
- `split_header` is the one header-section splitter (``header_fields`` lists its fields).
- For submission (RFC 6409 §8): `from_addresses` (the From field's addresses, for the
  sender-ownership check) and `completion_fields` (Date and Message-ID a submitted
  message lacks, and From from the envelope sender).
- `delivery_headers` gives ``Return-Path`` (RFC 5321 §4.4) and ``Delivered-To`` for a
  final delivery.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from email.utils import format_datetime, getaddresses

from .errors import MESSAGE_TOO_BIG, Reply, ReplyError

MAX_LINE = 998

BARE_CR_LF = Reply(554, "5.6.0", "Message contains a bare CR or LF; lines must end in CRLF")
NUL_BYTE = Reply(554, "5.6.0", "Message contains a NUL byte")
LINE_TOO_LONG = Reply(554, "5.6.0", "Message has a line longer than 998 characters")
LOOP = Reply(554, "5.4.6", "Too many Received headers: mail loop suspected")

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 §2.2 field name, then ":"
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")


class Content:
    """One DATA section, checked block by block as it is read.

    `feed` takes the content bytes in any chunks, as read: dot-stuffed lines (unless
    ``dot_stuffed=False``) with their CRLF, the end-of-data line itself excluded.
    Chunks are buffered and checked once at least `BLOCK` octets of complete lines are
    in hand. ``strict`` (the network face) refuses bare CR or LF and over-long lines;
    the local ``sendmail -bs`` face is lenient there (its lines may end in LF, and long
    lines are broken later, as for any local submission). A NUL byte and the size limit
    are refused in both. After the first refusal nothing more is kept; the caller reads
    on to the end of the data and then calls `finish`, which raises `ReplyError`.
    """

    BLOCK = 64 * 1024

    def __init__(self, limit: int, *, strict: bool = True, dot_stuffed: bool = True) -> None:
        self.limit = limit
        self.strict = strict
        self.dot_stuffed = dot_stuffed
        self.size = 0  # octets fed, as on the wire
        self.received = 0  # Received fields in the header section
        self.error: Reply | None = None
        self._parts: list[bytes] = [b""]  # [0] is the trace header, set by `join`
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._carry = b""  # an incomplete last line
        self._line_start = True  # the carry begins a line
        self._in_header = True
        self._first_line = True
        self._header: list[bytes] = []  # the header section as read (LF endings)

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.error is not None:
            return
        if self.size > self.limit:
            self._refuse(MESSAGE_TOO_BIG)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= self.BLOCK:
            self._flush(final=False)

    def finish(self) -> None:
        """The end of the data: check what is left; `ReplyError` if the content is refused."""
        if self.error is None:
            self._flush(final=True)
        if self.error is not None:
            raise ReplyError(self.error)

    def join(self, prefix: bytes = b"") -> bytes:
        """The checked content with LF endings, ``prefix`` (a trace header) on top. It
        copies the whole message once: the SMTP face calls it in a worker thread."""
        self._parts[0] = prefix
        data = b"".join(self._parts)
        self._parts = [b""]
        return data

    @property
    def header(self) -> bytes:
        """The header section read so far, LF-ended fields (as `split_header` gives it)."""
        return b"".join(self._header)

    def _refuse(self, reply: Reply) -> None:
        self.error = reply
        self._parts = [b""]
        self._pending = []
        self._carry = b""

    def _flush(self, *, final: bool) -> None:
        data = b"".join([self._carry, *self._pending])
        self._pending = []
        self._pending_size = 0
        cut = len(data) if final else data.rfind(b"\n") + 1
        block, self._carry = data[:cut], data[cut:]
        line_start = self._line_start
        self._line_start = True
        if len(self._carry) > MAX_LINE + 3:  # longer than a line can be, even stuffed
            if self.strict:
                self._refuse(LINE_TOO_LONG)
                return
            keep = len(self._carry) - 1 if self._carry.endswith(b"\r") else len(self._carry)
            block, self._carry = block + self._carry[:keep], self._carry[keep:]  # lenient: a long
            self._line_start = False  # line goes on in pieces (a CR kept, as an LF may follow)
        if block:
            self._check(block, line_start)

    def _check(self, block: bytes, line_start: bool) -> None:
        if b"\x00" in block:
            self._refuse(NUL_BYTE)
            return
        if self.strict:
            lines = block.split(b"\r\n")
            lf = b"\n".join(lines)
            # Every CR and every LF must be part of a CRLF: no CR is left, and no LF but those.
            if b"\r" in lf or block.count(b"\n") != len(lines) - 1:
                self._refuse(BARE_CR_LF)
                return
            if self._too_long(lines):
                self._refuse(LINE_TOO_LONG)
                return
        else:
            lf = block.replace(b"\r\n", b"\n")
        if self.dot_stuffed and b"." in block:  # RFC 5321 §4.5.2: drop a line's leading dot
            if line_start and lf[:1] == b".":
                lf = lf[1:]
            lf = lf.replace(b"\n.", b"\n")
        if self._in_header:
            self._scan_header(lf)
        self._parts.append(lf)

    def _too_long(self, lines: list[bytes]) -> bool:
        longest = max(map(len, lines))
        if longest <= MAX_LINE or not self.dot_stuffed:
            return longest > MAX_LINE
        # One octet more is a stuffed line whose first dot goes (RFC 5321 §4.5.2).
        return longest > MAX_LINE + 1 or any(len(x) > MAX_LINE and x[:1] != b"." for x in lines)

    def _scan_header(self, block: bytes) -> None:
        """Count Received fields until the header section ends (as `split_header` does)."""
        pos, size = 0, len(block)
        while pos < size:
            end = block.find(b"\n", pos)
            stop = size if end < 0 else end + 1
            first, self._first_line = self._first_line, False
            if stop - pos == 1 and block[pos] == 0x0A:
                self._in_header = False
                break
            if block[pos] in (0x20, 0x09) and not first:
                pass  # a continuation line
            elif _FIELD.match(block, pos, stop):
                if block[pos : pos + 9].lower() == b"received:":
                    self.received += 1
            else:
                self._in_header = False
                break
            pos = stop
        self._header.append(block[:pos])


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
    tls: str = "",
) -> bytes:
    """``Received: from helo ([ip]) by host (monomail) with ESMTP id QID for <rcpt>; date``;
    ``tls`` ("TLSv1.3 TLS_AES_256_GCM_SHA384") adds ``(using TLSv1.3 with cipher ...)``
    as Postfix writes it."""
    ip = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    stamp = _date(int(when))
    text = f"Received: from {safe_word(helo)} ([{ip}])\n"
    if tls:
        version, _, cipher = tls.partition(" ")
        text += f"\t(using {version} with cipher {cipher})\n" if cipher else f"\t(using {version})\n"
    text += f"\tby {hostname} (monomail) with {protocol} id {queue_id}"
    if recipient:
        text += f"\n\tfor <{recipient}>"
    return (text + f"; {stamp}\n").encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date in local time; cached, as every message of one second shares it."""
    return format_datetime(datetime.fromtimestamp(second, UTC).astimezone())


def from_addresses(header: bytes) -> list[str]:
    """The addresses of every From field of a header section ("" for one that does not parse)."""
    values = [f.split(b":", 1)[1].decode("utf-8", "surrogateescape").replace("\n", "")
              for f in header_fields(header) if f[:5].lower() == b"from:"]
    return [address for _, address in getaddresses(values)] if values else []


def completion_fields(header: bytes, *, sender: str, hostname: str, queue_id: str, when: float) -> bytes:
    """What a submitted message lacks (RFC 6409 §8.2, §8.3): Date, Message-ID, and From
    (the envelope sender) when it has none and the sender is not null."""
    names = {f.split(b":", 1)[0].strip().lower() for f in header_fields(header)}
    added = b""
    if b"from" not in names and sender:
        added += f"From: <{sender}>\n".encode("utf-8", "surrogateescape")
    if b"date" not in names:
        added += f"Date: {_date(int(when))}\n".encode()
    if b"message-id" not in names:
        added += f"Message-ID: <{queue_id}@{hostname}>\n".encode()
    return added


def delivery_headers(sender: str, delivered_to: str) -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {delivered_to}\n".encode("utf-8", "surrogateescape")

