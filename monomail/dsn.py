"""Delivery status notifications: the bounce (and the "still trying" warning) as bytes.

Job: build one DSN message for one original message, as a pure function of its inputs
(`build_report`). The queue decides *when* to send one and delivers it with the null
sender; this module only decides what it says.

Standards:

- RFC 6522 (was RFC 3462): ``multipart/report; report-type=delivery-status`` with three
  parts: a human-readable ``text/plain`` explanation, the machine-readable
  ``message/delivery-status``, and the original header section as ``text/rfc822-headers``.
- RFC 3464: the delivery-status fields. One per-message block (``Reporting-MTA``,
  ``Arrival-Date``), then one block per recipient (``Final-Recipient``, ``Action``,
  ``Status``, ``Remote-MTA``, ``Diagnostic-Code``, ``Last-Attempt-Date``,
  ``Will-Retry-Until``; the last only for ``delayed``, as §2.3.8 requires).
- RFC 3463: the ``Status`` codes.
- RFC 6533: a non-ASCII recipient is written as ``Final-Recipient: utf-8; <xtext>`` with
  ``\\x{HEX}`` escapes, so the delivery-status part stays 7-bit.
- RFC 3834: ``Auto-Submitted: auto-replied``, so responders do not answer the bounce.

Security stance: every string that reaches a header (addresses, the remote reply text,
host names) is reduced to one line first: control characters, CR and LF become spaces, so
nothing can start a new header (DESIGN invariant 5). The output is built from
``email.message.Message`` objects and written with the *compat32* policy, which writes a
field value as given and folds it at spaces. The default policy is avoided on purpose: it
re-parses values and decodes RFC 2047 encoded words, so a remote reply of
``=?utf-8?q?=0D=0AX-Evil:_1?=`` would come out as a new header line (CPython gh-121650,
CVE-2024-6923, unfixed in the Python 3.11 we run on). Every line is at most 998
characters (RFC 5322 §2.1.1) and ends in LF. All parts are 7-bit; only a non-ASCII
(SMTPUTF8) sender makes the ``To:`` field 8-bit, so such a DSN must go out with SMTPUTF8.

Not here: deciding whether a DSN is due, never bouncing a bounce (the caller checks the
null sender; `build_report` refuses it), delivering it, or returning the full body.

A recipient the queue gave up on (``gave_up_after``) is reported as "gave up after 5d;
last error: ..." and, like every ``failed`` report, without a retry promise that the
last reply may carry ("..., will retry", "try again later"): nobody will.

This module imports only ``schedule`` (pure).
"""

from __future__ import annotations

import contextlib
import io
import quopri
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import Message
from email.utils import format_datetime, make_msgid

from .schedule import duration

MAX_LINE = 998  # RFC 5322 §2.1.1, without the line ending
MAX_HEADERS = 64 * 1024  # how much of the original header section is returned
MAX_FIELD = 900  # characters of one DSN field value, so name + value stays under MAX_LINE

ACTIONS = ("failed", "delayed")
SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"

# compat32 writes our values verbatim and folds long ones at spaces (see the docstring
# for why not policy.SMTP); LF endings as monomail stores messages.
_POLICY = email_policy.compat32.clone(linesep="\n", max_line_length=78)

_SURROGATES = re.compile(r"[\ud800-\udfff]")
# C0, DEL, C1 (includes NEL) and the Unicode line/paragraph separators.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same, but keeping TAB and LF: for multi-line text bodies.
_BODY_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_STATUS = re.compile(r"[45]\.\d{1,3}\.\d{1,3}\Z")
_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")  # RFC 6533 xtext safe
# A retry promise at the end of a reply's text, wrong in a final report.
_RETRY_PROMISE = re.compile(r"[\s,;:.-]*\b(?:will retry|(?:please )?try again(?: later)?)[\s.!]*\Z", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one recipient, as the DSN reports it."""

    recipient: str  # the address as accepted (e.g. "bob@remote.test")
    action: str  # "failed" | "delayed"
    status: str  # RFC 3463 code, e.g. "5.1.1" or "4.4.1"
    diagnostic: str = ""  # e.g. "550 5.1.1 No such user" (the remote or local reply text); "" to omit
    remote_mta: str = ""  # e.g. "mx1.remote.test"; "" to omit
    last_attempt: float | None = None  # unix time; Last-Attempt-Date when given
    will_retry_until: float | None = None  # unix time; Will-Retry-Until (for "delayed")
    gave_up_after: float | None = None  # seconds since arrival, for a "failed" the queue gave up on


def build_report(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival: float,
    reports: Sequence[RecipientReport],
    original: bytes,
    now: float,
) -> bytes:
    """The whole DSN message as bytes with LF line endings, ready to deliver with the null sender.

    ``reporting_mta`` is our host name; ``sender`` the original envelope sender (the DSN
    goes ``To:`` it); ``queue_id`` the original's queue id; ``arrival`` and ``now`` unix
    times; ``original`` the original message with LF endings (only its header section is
    returned, at most `MAX_HEADERS` bytes).

    Error handling: odd *content* never raises. Control characters are replaced, invalid
    UTF-8 in the original headers becomes U+FFFD, over-long values are cut, a status that
    is not an RFC 3463 code becomes ``5.0.0`` / ``4.0.0``, and a time that cannot be
    formatted leaves its field out. Caller mistakes raise `ValueError`: an empty
    ``sender`` (a bounce is never bounced, DESIGN invariant 7), no ``reports``, or an
    action other than ``failed`` / ``delayed``.
    """
    if not sender:
        raise ValueError("no DSN to the null sender")
    if not reports:
        raise ValueError("a DSN needs at least one recipient report")
    for report in reports:
        if report.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {report.action!r}")

    host = _host(reporting_mta) or "localhost"
    delayed_only = all(r.action == "delayed" for r in reports)

    dsn = Message(policy=_POLICY)
    dsn["From"] = f"Mail Delivery System <MAILER-DAEMON@{host}>"
    dsn["To"] = _address_header(sender)
    dsn["Subject"] = SUBJECT_DELAYED if delayed_only else SUBJECT_FAILED
    if date := _date(now):
        dsn["Date"] = date
    dsn["Message-ID"] = make_msgid(domain=host)
    dsn["Auto-Submitted"] = "auto-replied"
    if qid := _field(queue_id):
        dsn["X-Original-Queue-Id"] = qid
    dsn["MIME-Version"] = "1.0"
    dsn["Content-Type"] = "multipart/report; report-type=delivery-status"
    dsn.attach(_text_part("text/plain", "Notification", _explanation(host, queue_id, reports)))
    dsn.attach(_status_part(host, arrival, reports))
    dsn.attach(_text_part("text/rfc822-headers", "Undelivered Message Headers", _header_section(original)))

    out = io.BytesIO()
    # The generator picks a boundary that occurs nowhere in the parts.
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(dsn)
    return out.getvalue()


# -- the three parts -------------------------------------------------------------------


def _explanation(host: str, queue_id: str, reports: Sequence[RecipientReport]) -> str:
    """Part 1: what happened, in words. Generic: the reply texts, never our internals."""
    failed = [r for r in reports if r.action == "failed"]
    delayed = [r for r in reports if r.action == "delayed"]
    lines = [f"This is the mail delivery system at {host}.", ""]
    if failed:
        lines += [
            "Your message could not be delivered to the recipients below. This is a",
            "permanent error; the system has given up on them.",
            "",
            *(f"  <{_one_line(r.recipient)}>: {_reason(r)}" for r in failed),
            "",
        ]
    if delayed:
        lines += [
            "Delivery to the recipients below has been delayed. The system will keep",
            "trying; you do not need to send the message again.",
            "",
        ]
        for r in delayed:
            until = _date(r.will_retry_until)
            lines.append(f"  <{_one_line(r.recipient)}>: {_reason(r)}")
            if until:
                lines.append(f"    (will keep trying until {until})")
        lines.append("")
    lines += [
        "The headers of your message are attached; the technical report is in the",
        "delivery-status part.",
        "",
        f"Queue id: {_one_line(queue_id)}",
    ]
    return "\n".join(lines) + "\n"


def _diagnostic(report: RecipientReport) -> str:
    """The reply as reported: a final report makes no retry promise."""
    text = _one_line(report.diagnostic, MAX_FIELD)
    return _RETRY_PROMISE.sub("", text) if report.action == "failed" else text


def _reason(report: RecipientReport) -> str:
    reason = _diagnostic(report) or f"status {_status(report)}"
    if report.gave_up_after is not None:
        reason = f"gave up after {duration(report.gave_up_after)}; last error: {reason}"
    if report.remote_mta:
        reason += f" (remote host {_host(report.remote_mta)})"
    return reason


def _status_part(host: str, arrival: float, reports: Sequence[RecipientReport]) -> Message:
    """Part 2: RFC 3464 ``message/delivery-status``, a list of header blocks."""
    blocks: list[Message | str] = []
    per_message = Message(policy=_POLICY)
    per_message["Reporting-MTA"] = f"dns; {host}"
    if date := _date(arrival):
        per_message["Arrival-Date"] = date
    blocks.append(per_message)
    for report in reports:
        block = Message(policy=_POLICY)
        block["Final-Recipient"] = _final_recipient(report.recipient)
        block["Action"] = report.action
        block["Status"] = _status(report)
        if remote := _host(report.remote_mta):
            block["Remote-MTA"] = f"dns; {remote}"
        if diagnostic := _field(_diagnostic(report)):
            block["Diagnostic-Code"] = f"smtp; {diagnostic}"
        if date := _date(report.last_attempt):
            block["Last-Attempt-Date"] = date
        if report.action == "delayed" and (date := _date(report.will_retry_until)):
            block["Will-Retry-Until"] = date
        blocks.append(block)
    part = Message(policy=_POLICY)
    part["Content-Description"] = "Delivery report"
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _header_section(original: bytes) -> str:
    """Part 3's text: the original header section, cut to `MAX_HEADERS` at a line end."""
    chunk = original[: MAX_HEADERS + 4].replace(b"\r\n", b"\n")
    if chunk.startswith(b"\n"):
        return ""
    end = chunk.find(b"\n\n")
    if end >= 0 and end < MAX_HEADERS:
        head = chunk[: end + 1]
    else:
        head = chunk[:MAX_HEADERS]
        if len(original) > len(head):
            cut = head.rfind(b"\n")
            head = head[: cut + 1] if cut >= 0 else b""
    # errors="replace", not "surrogateescape": this part is for people and mail readers,
    # so the exact bytes of a malformed header do not matter, while a str with lone
    # surrogates cannot be encoded as UTF-8 for a quoted-printable part (it would raise,
    # or force an 8-bit part that needs 8BITMIME at every hop back to the sender). Valid
    # UTF-8 (RFC 6532 headers) comes through unchanged. Control characters other than
    # TAB and LF are never valid in a header; they become U+FFFD too.
    text = _BODY_CONTROLS.sub("\ufffd", head.decode("utf-8", errors="replace"))
    if text and not text.endswith("\n"):
        text += "\n"
    return text


def _text_part(content_type: str, description: str, text: str) -> Message:
    """A UTF-8 text part: 7bit when it is plain short-lined ASCII, else quoted-printable
    (which also wraps long lines), so the DSN never needs 8BITMIME."""
    text = _BODY_CONTROLS.sub("\ufffd", _SURROGATES.sub("\ufffd", text))
    part = Message(policy=_POLICY)
    part["Content-Description"] = description
    part["Content-Type"] = f"{content_type}; charset=utf-8"
    if text.isascii() and all(len(line) <= MAX_LINE for line in text.split("\n")):
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(text)
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(quopri.encodestring(text.encode("utf-8")).decode("ascii"))
    return part


# -- making values safe ----------------------------------------------------------------


def _one_line(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` as one line: surrogates → U+FFFD, controls and runs of space → one space."""
    text = _CONTROLS.sub(" ", _SURROGATES.sub("\ufffd", text))
    return " ".join(text.split())[:limit]


def _escape(ch: str) -> str:
    return f"\\x{{{ord(ch):X}}}"  # RFC 6533 EmbeddedUnicodeChar


def _field(text: str) -> str:
    """A 7-bit, one-line DSN field value of at most `MAX_FIELD` characters. Non-ASCII
    becomes ``\\x{HEX}`` (the full text is in the human-readable part)."""
    out: list[str] = []
    size = 0
    for ch in _one_line(text):
        piece = ch if ch.isascii() else _escape(ch)
        if size + len(piece) > MAX_FIELD:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _final_recipient(address: str) -> str:
    """``rfc822; addr`` or, for a non-ASCII address, RFC 6533 ``utf-8; xtext``."""
    address = _one_line(address, 320)
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(ch if _QCHAR.match(ch) else _escape(ch) for ch in address)


def _address_header(address: str) -> str:
    """The sender for ``To:``. A non-ASCII (SMTPUTF8) address is passed as raw UTF-8
    (RFC 6532; an encoded word is not allowed in an address): smuggled to the compat32
    generator as surrogate escapes, which it writes back as the original bytes."""
    address = _one_line(address, 320)
    if address.isascii():
        return address
    return address.encode("utf-8").decode("ascii", "surrogateescape")


def _host(name: str) -> str:
    """A host name reduced to a safe alphabet (IDNA for non-ASCII when possible)."""
    name = _one_line(name, 255)
    if not name.isascii():
        with contextlib.suppress(UnicodeError):  # not a valid IDN: the filter below copes
            name = name.encode("idna").decode("ascii")
    return _HOST_UNSAFE.sub("_", name)


def _status(report: RecipientReport) -> str:
    status = report.status.strip()
    if _STATUS.match(status):
        return status
    return "4.0.0" if report.action == "delayed" else "5.0.0"


def _date(when: float | None) -> str:
    """RFC 5322 date in local time, or "" for a time that cannot be one."""
    if when is None:
        return ""
    try:
        return format_datetime(datetime.fromtimestamp(when, UTC).astimezone())
    except (OverflowError, OSError, ValueError):
        return ""
