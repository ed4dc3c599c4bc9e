"""SMTP replies and monomail's exception tree: the one place that says how things fail.

Job: the vocabulary every other module uses to say "no" (or "not now"). A `Reply` is
what a client sees: a basic code (RFC 5321 §4.2), an enhanced status code (RFC 3463)
and generic text. Causes (paths, exception text) never go into a Reply to an SMTP
client; they go to the log (DESIGN invariant 6).

The tree (httpx's ``_exceptions.py`` is the model: every class here, drawn once)::

    MonomailError                 everything monomail raises on purpose
    ├── ConfigError               bad monomail.toml; ``key`` is the dotted key path
    ├── UsageError                a bad command line (the command's usage exit code)
    ├── SpoolError                the spool cannot be read or written
    │   ├── SpoolBusy             another ``monomail serve`` holds this spool
    │   └── CorruptEntry          one queue entry cannot be read (moved aside, never fatal)
    ├── ReplyError                carries the Reply to send (h11-style: the error knows its answer)
    │   ├── AddressError          a MAIL/RCPT path that does not parse (5.1.3 / 5.1.7 / 5.5.4)
    │   ├── RouteError            a recipient we will not take (5.1.1 unknown, 5.7.1 relay, 5.4.6 loop)
    │   ├── ProtocolError         an SMTP command that is refused (bad sequence, bad parameter)
    │   ├── AuthUnavailable       the password backend cannot answer now (454 4.7.0)
    │   └── DeliveryError         a transport could not deliver; the reply says for how long
    │       ├── MailboxLocked     an mbox stayed locked for the whole lock timeout (4.2.0)
    │       ├── DestinationError  no host to try for a domain (DNS: 5.1.2, 5.1.10, 4.4.3)
    │       └── HostError         this remote host failed; the next one may be tried
    ├── RecipeError               a syntax error in a procmail-style rcfile (``name:line:``)
    ├── ReaderError               ``monomail mail``: something the user is told in one line
    │   ├── MailboxChanged        the mbox changed under the reader; nothing was written
    │   └── RewriteError          an in-place mbox rewrite could not be done or finished
    └── Failure                   a command-line tool's failure with its sysexits(3) code

Error handling everywhere: an exception that is *not* in this tree was not classified
by anyone, and counts as temporary (DESIGN invariant 2). `reply_for` is the one place
that turns any exception into the Reply to act on: a `ReplyError`'s own reply, a
full disk (4.3.1) or full quota (4.2.2), and 4.3.0 for everything else. Third-party
exceptions are mapped into this tree once, in the module that imports the library
(``remote`` for aiosmtplib and dnspython), with ``raise Ours(...) from exc``.

This module imports nothing of ours.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``451 4.3.0 Local error``."""

    code: int
    status: str  # enhanced status code, e.g. "4.3.0"; "" where RFC 2034 forbids one
    text: str

    def __str__(self) -> str:
        if self.status:
            return f"{self.code} {self.status} {self.text}"
        return f"{self.code} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


class MonomailError(Exception):
    """Base of everything monomail raises on purpose."""


class ConfigError(MonomailError):
    """monomail.toml is wrong; ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class UsageError(MonomailError):
    """A bad command line; the command answers with its usage exit code."""


class SpoolError(MonomailError):
    """The spool could not be read or written."""


class SpoolBusy(SpoolError):
    """Another ``monomail serve`` holds the spool's exclusive lock."""


class CorruptEntry(SpoolError):
    """One queue entry cannot be read or makes no sense; ``qid`` names it."""

    def __init__(self, qid: str, message: str) -> None:
        self.qid = qid
        super().__init__(message)


class ReplyError(MonomailError):
    """An error that knows the SMTP reply it should produce."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        self.reply = reply
        self.detail = detail or reply.text
        super().__init__(self.detail)


class AddressError(ReplyError):
    """A MAIL FROM or RCPT TO path that does not parse."""


class RouteError(ReplyError):
    """A recipient that routing refuses."""


class ProtocolError(ReplyError):
    """An SMTP command refused by the transaction core (sequence, syntax, parameters)."""


class AuthUnavailable(ReplyError):
    """The password backend (the password file, Dovecot's auth service) cannot answer now."""

    def __init__(self, detail: str) -> None:
        super().__init__(AUTH_UNAVAILABLE, detail)


class DeliveryError(ReplyError):
    """A transport could not deliver; ``reply.temporary`` says whether to retry."""


# Replies used in more than one place. Text is generic on purpose.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
BYE = Reply(221, "2.0.0", "Bye")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error")
NOT_ENOUGH_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
QUOTA_EXCEEDED = Reply(452, "4.2.2", "Mailbox full")
MAILBOX_BUSY = Reply(450, "4.2.0", "Mailbox busy, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BAD_ADDRESS = Reply(553, "5.1.3", "Bad address syntax")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")


class MailboxLocked(DeliveryError):
    """The mailbox stayed locked by someone else for the whole lock timeout."""

    def __init__(self, detail: str) -> None:
        super().__init__(MAILBOX_BUSY, detail)


class DestinationError(DeliveryError):
    """No host to try for a destination: the reply says whether that is permanent."""


class HostError(DeliveryError):
    """This host could not take the message; try the next one."""


class RecipeError(MonomailError):
    """A syntax error in an rcfile; the message starts with ``name:line:``."""

    def __init__(self, name: str, line: int, reason: str) -> None:
        super().__init__(f"{name}:{line}: {reason}")
        self.name = name
        self.line = line
        self.reason = reason


class ReaderError(MonomailError):
    """``monomail mail``: something the user is told in one line (no traceback)."""


class MailboxChanged(ReaderError):
    """The mbox no longer starts with what this session loaded: nothing was written."""


class RewriteError(ReaderError):
    """An in-place mbox rewrite could not be done or finished."""


class Failure(MonomailError):
    """A command-line tool's failure: its sysexits(3) code and a one-line reason."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def reply_for(exc: BaseException) -> Reply:
    """The Reply to act on for any exception. Only a `ReplyError` can be permanent; every
    other error is temporary (DESIGN invariant 2)."""
    if isinstance(exc, ReplyError):
        return exc.reply
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return NOT_ENOUGH_STORAGE
        if exc.errno == errno.EDQUOT:
            return QUOTA_EXCEEDED
    return LOCAL_ERROR
