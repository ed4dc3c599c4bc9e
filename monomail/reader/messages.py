"""One message of a mailbox as ``monomail mail`` holds it, and how it is shown.

Job: the reader's message model (`Message`: its bytes, envelope sender, arrival time,
read state and where it lives in its folder) and its two views: the one-line summary
(`summary_line`, as mailx's header listing) and the text printed for ``p``
(`render`). Header fields are decoded (RFC 2047), unfolded (RFC 5322 §2.2.3) and shown
without control characters, so no message can drive the terminal. Not here: reading
or writing folders (``folders``), MIME rendering beyond undoing a single text part's
base64 or quoted-printable (RFC 2045 §6).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.header import decode_header, make_header
from email.message import Message as EmailHeaders
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses, parsedate_to_datetime

from ..message import split_header

CONTROL = {c: "?" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}
"""``str.translate`` table: every control character but TAB and LF shows as ``?``."""


@dataclass(eq=False, slots=True)
class Message:
    """One message; mutable on purpose: the session marks it read or deleted."""

    raw: bytes  # the message as delivered (mboxrd quoting undone), LF line ends
    envelope_sender: str
    received: float
    flags: str  # Maildir info flags, or the letters of an mbox Status: field
    new: bool
    seen: bool
    deleted: bool = False
    read_now: bool = False  # shown in this session
    # mbox: where it is in the loaded bytes
    start: int = 0
    end: int = 0
    from_line: bytes = b""
    quoted: bytes = b""
    sep: bytes = b""
    # Maildir: its file
    subdir: str = ""
    name: str = ""
    _headers: EmailHeaders | None = field(default=None, repr=False)

    @property
    def headers(self) -> EmailHeaders:
        if self._headers is None:
            self._headers = BytesHeaderParser(policy=policy.compat32).parsebytes(self.raw)
        return self._headers

    def header(self, name: str) -> str:
        """A header field decoded (RFC 2047), unfolded, without control characters."""
        value = self.headers.get(name)
        if value is None:
            return ""
        try:
            text = str(make_header(decode_header(str(value))))
        except Exception:  # noqa: BLE001 - a malformed encoded-word shows as it is
            text = str(value)
        return " ".join(text.split()).translate(CONTROL)

    @property
    def marker(self) -> str:
        if self.deleted:
            return "D"
        if self.seen or self.read_now:
            return " "
        return "N" if self.new else "U"


def _sender_display(m: Message) -> str:
    pairs = getaddresses([m.header("From")])
    name, addr = pairs[0] if pairs else ("", "")
    return name or addr or m.envelope_sender or "(unknown)"


def _date_display(m: Message) -> str:
    when = None
    date = m.header("Date")
    if date:
        with contextlib.suppress(Exception):
            when = parsedate_to_datetime(date).astimezone()
    if when is None:
        when = datetime.fromtimestamp(m.received)
    return f"{when:%a %b} {when.day:2d} {when:%H:%M}"


def summary_line(number: int, m: Message, current: bool) -> str:
    lines = m.raw.count(b"\n")
    subject = m.header("Subject")
    return (f"{'>' if current else ' '}{m.marker} {number:3d} {_sender_display(m)[:24]:<24} "
            f"{_date_display(m)}  {f'{lines}/{len(m.raw)}':>9}  {subject}")


def render(m: Message) -> str:
    """The message as it is; if it is one text part in base64 or quoted-printable, its
    header section followed by the decoded text."""
    out = m.raw.decode("utf-8", "replace")
    with contextlib.suppress(Exception):
        parsed = BytesParser(policy=policy.default).parsebytes(m.raw)
        if (not parsed.is_multipart() and parsed.get_content_maintype() == "text"
                and parsed.get("Content-Transfer-Encoding", "").strip().lower() in ("base64", "quoted-printable")):
            head, _ = split_header(m.raw)
            out = head.decode("utf-8", "replace") + "\n" + parsed.get_content()
    return out.translate(CONTROL) + ("" if out.endswith("\n") else "\n")
