"""SMTP replies and monomail's exception tree.

Job: the vocabulary every other module uses to say "no" (or "not now"). A `Reply` is
what a client sees: a basic code (RFC 5321 §4.2), an enhanced status code (RFC 3463)
and generic text. Causes (paths, exception text) never go into a Reply; they go to the
log (DESIGN invariant 6).

The tree::

    MonomailError
    ├── ConfigError          bad monomail.toml; names the key path
    ├── SpoolError           the spool cannot be read or written
    └── ReplyError           carries the Reply to send (h11-style: the error knows its answer)
        ├── AddressError     a MAIL/RCPT path that does not parse (5.1.3 / 5.1.7 / 5.5.4)
        └── RouteError       a recipient we will not take (5.1.1 unknown, 5.7.1 relay, 5.4.6 loop)

Delivery failures are not exceptions here: transports turn them into `Outcome`
values (see `envelope`), temporary or permanent, and an exception nobody classified
counts as temporary (DESIGN invariant 2).

This module imports nothing of ours.
"""

from __future__ import annotations

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


class SpoolError(MonomailError):
    """The spool could not be read or written."""


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


# Replies used in more than one place. Text is generic on purpose.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
BYE = Reply(221, "2.0.0", "Bye")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
NOT_ENOUGH_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BAD_ADDRESS = Reply(553, "5.1.3", "Bad address syntax")
