"""The mail log: one line per mail event, keyed by queue id.

Job: the only place that formats mail events, so an admin can grep one queue id and
see its whole story (received, delivered, deferred, failed), Postfix-style::

    4f1c2a9e0b3d: received from=<a@x.test> size=2048 nrcpt=1 client=[127.0.0.1] helo=x.test
    4f1c2a9e0b3d: to=<alice@example.test> status=delivered (maildir /var/mail/alice)

Causes (exception text, paths) go here and never into SMTP replies (DESIGN invariant 6).
What a client sent (HELO names, addresses, remote replies) goes through `printable`
first, so no line of the log holds a raw control character; `PrintableFilter` does the
same for the lines of a library's logger (aiosmtpd's ``mail.log``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .envelope import Envelope, Outcome, Status

log = logging.getLogger("monomail.mail")

# Observers (``metrics``): told of each "received" (an Envelope) and "outcome" (an Outcome)
# logged here, from the loop or a worker thread. Added and removed by ``app``.
observers: list[Callable[[str, Envelope | Outcome], None]] = []


def printable(text: str | bytes) -> str:
    """Client-supplied text made safe for one log line: control characters, invalid UTF-8
    (surrogate escapes) and other unprintable characters become ``\\xNN``/``\\uNNNN``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ord(ch)) for ch in text)


def _escape(code: int) -> str:
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class PrintableFilter(logging.Filter):
    """A logging filter that passes every record through `printable` (installed once on a
    library's logger whose lines may hold client bytes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record: leave it to logging's own error handling
            return True
        record.msg, record.args = printable(message), None
        return True


def received(env: Envelope, *, client: str, helo: str, tls: str = "", user: str | None = None) -> None:
    """``tls`` is the session's version and cipher; ``user`` the authenticated login."""
    extra = (f" tls={tls.replace(' ', ':')}" if tls else "") + (f" user={printable(user)}" if user else "")
    log.info(
        "%s: received from=<%s> size=%d nrcpt=%d client=[%s] helo=%s%s",
        env.id, printable(env.sender), env.size, len(env.recipients), client, printable(helo), extra,
    )
    for observer in tuple(observers):
        observer("received", env)


def outcome(qid: str, o: Outcome, *, attempt: int = 1) -> None:
    level = logging.INFO if o.status is Status.DELIVERED else logging.WARNING
    log.log(level, "%s: to=<%s> status=%s attempt=%d reply=%s (%s)",
            qid, printable(o.recipient), o.status.value, attempt, printable(str(o.reply)), printable(o.detail))
    for observer in tuple(observers):
        observer("outcome", o)


def queued(qid: str, deferred: int, next_in: float) -> None:
    log.info("%s: queued deferred=%d next_attempt_in=%.0fs", qid, deferred, next_in)


def removed(qid: str, why: str) -> None:
    log.info("%s: removed (%s)", qid, why)


def problem(qid: str, what: str) -> None:
    log.error("%s: %s", qid, printable(what))
