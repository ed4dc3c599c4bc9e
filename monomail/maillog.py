"""The mail log: one line per mail event, keyed by queue id.

Job: the only place that formats mail events, so an admin can grep one queue id and
see its whole story (received, delivered, deferred, failed), Postfix-style::

    4f1c2a9e0b3d: received from=<a@x.test> size=2048 nrcpt=1 client=[127.0.0.1] helo=x.test
        session=3fa9c2d1e0b4 message-id=<1234@x.test>
    4f1c2a9e0b3d: to=<alice@example.test> status=delivered attempt=1 reply=250 ... (maildir /var/mail/alice)
    4f1c2a9e0b3d: to=<bob@far.test> status=deferred relay=mx.far.test attempt=1 reply=451 ... (cause)

Two context variables say which message and which connection a line is about, for lines
logged by modules that do not know (``remote``, ``deliver``): `QUEUE_ID` is set for one
delivery attempt (`about`), `SESSION` for one SMTP connection's task (`new_session_id`
makes its value). ``logsetup`` puts them on every line (the queue id first, then the
session as ``session=``, or as JSON fields).

Causes (exception text, paths) go here and never into SMTP replies (DESIGN invariant 6).
What a client sent (HELO names, addresses, remote replies) goes through `printable`
first, so no line of the log holds a raw control character.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from .envelope import Envelope, Outcome, Status
from .errors import Reply, ReplyError
from .message import header_fields, split_header

log = logging.getLogger("monomail.mail")

# Observers (``metrics``): told of each "received" (an Envelope) and "outcome" (an Outcome)
# logged here, from the loop or a worker thread. Added and removed by ``app``.
observers: list[Callable[[str, Envelope | Outcome], None]] = []
QUEUE_ID: ContextVar[str] = ContextVar("monomail_queue_id", default="")
SESSION: ContextVar[str] = ContextVar("monomail_session", default="")
MESSAGE_ID_MAX = 200  # characters of a Message-ID kept for the log


def new_session_id() -> str:
    """A short id for one SMTP connection (12 hex digits, random: unique in practice; not a
    secret, so the cheap generator, no system call per connection)."""
    return f"{random.getrandbits(48):012x}"


@contextlib.contextmanager
def about(qid: str) -> Iterator[None]:
    """Lines logged inside are about message ``qid`` (in this task and those it starts)."""
    token = QUEUE_ID.set(qid)
    try:
        yield
    finally:
        QUEUE_ID.reset(token)


def message_id(data: bytes) -> str:
    """The Message-ID field's value of a message (LF line ends), unfolded and made
    printable, or "" when it has none."""
    for f in header_fields(split_header(data)[0]):
        name, _, value = f.partition(b":")
        if name.strip().lower() == b"message-id":
            text = " ".join(value.decode("utf-8", "surrogateescape").split())
            return printable(text[:MESSAGE_ID_MAX])
    return ""


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


def received(env: Envelope, *, client: str, helo: str, tls: str = "", user: str | None = None,
             data: bytes | None = None) -> None:
    """``tls`` is the session's version and cipher; ``user`` the authenticated login;
    ``data`` the message, for its Message-ID. The connection's session id (`SESSION`) is
    named on the line. Nothing is formatted (nor the Message-ID looked for) when the
    level leaves the line out."""
    if log.isEnabledFor(logging.INFO):
        extra = (f" tls={tls.replace(' ', ':')}" if tls else "") + (f" user={printable(user)}" if user else "")
        if session := SESSION.get():
            extra += f" session={session}"
        if data is not None:
            extra += f" message-id={message_id(data) or '(none)'}"
        log.info(
            "%s: received from=<%s> size=%d nrcpt=%d client=[%s] helo=%s%s",
            env.id, printable(env.sender), env.size, len(env.recipients), client, printable(helo), extra,
        )
    for observer in tuple(observers):
        observer("received", env)


def outcome(qid: str, o: Outcome, *, attempt: int = 1) -> None:
    level = logging.INFO if o.status is Status.DELIVERED else logging.WARNING
    if log.isEnabledFor(level):  # else nothing to format
        relay = f" relay={printable(o.remote_host)}" if o.remote_host else ""
        log.log(level, "%s: to=<%s> status=%s%s attempt=%d reply=%s (%s)", qid, printable(o.recipient),
                o.status.value, relay, attempt, printable(str(o.reply)), printable(o.detail))
    for observer in tuple(observers):
        observer("outcome", o)


def queued(qid: str, deferred: int, next_in: float) -> None:
    log.info("%s: queued deferred=%d next_attempt_in=%.0fs", qid, deferred, next_in)


def removed(qid: str, why: str) -> None:
    log.info("%s: removed (%s)", qid, why)


def refused_rcpt(line: bytes, client: str, helo: str, sender: str | None, reply: Reply,
                 error: ReplyError | None) -> None:
    """A recipient refused at RCPT (4xx or 5xx): the command, who sent it (client, HELO
    name, sender: ``<>`` for the null sender, ``(none)`` before MAIL), the reply and why."""
    log.info("refused %s client=[%s] helo=%s from=%s reply=%s: %s", printable(line[:300].rstrip(b"\r\n")), client,
             printable(helo) or "(none)", "(none)" if sender is None else f"<{printable(sender)}>",
             printable(str(reply)), printable(error.detail if error is not None else ""))


def changed(qid: str, what: str, by: str) -> None:
    """A queue entry changed by hand (``monomail queue``): ``deleted``, ``held``..., and who asked."""
    log.info("%s: %s by %s", qid, what, printable(by))


def problem(qid: str, what: str) -> None:
    log.error("%s: %s", qid, printable(what))
