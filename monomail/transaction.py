"""The SMTP transaction core: every decision about an SMTP command, for every SMTP face.

Job: one session's protocol state, and the answer to every command line a client sends,
decided once for ``monomail serve`` (``server``, over the network) and ``monomail
sendmail -bs`` (``sendmail.stdio``, on standard input and output) alike. It is pure in
the manner of h11: no I/O, no clock, no logging. A face reads a line, hands it to
`Transaction.receive` and writes the replies of the `Step` it gets back; after a 354 it
feeds the message content to `Transaction.content` (a `message.Content`) and calls
`Transaction.end_data`, which gives the complete `Message` (or the refusal). What to do
with an accepted message is the face's business (``queue.accept``, or the sendmail
hand-over); so is the recipient policy, handed in as ``check``.

The states and the commands that move between them are the table `TRANSITIONS`; a
command that the table does not allow in the current state gets its reply from
`OUT_OF_SEQUENCE` (503 5.5.1). Errors carry the reply to send (``errors.ProtocolError``
for syntax, sequence and parameters, ``AddressError`` from ``envelope.parse_path``,
``RouteError`` from the policy); `Step.refused` keeps the error for the face's log, and
its detail never reaches the client (DESIGN invariant 6).

Decided here: command line syntax (a NUL, CR or, on the network, a bare LF in a line:
501 5.5.2; over 512 octets, 548 for MAIL after EHLO: 500 5.5.2); unknown commands
(500 5.5.1; the fifth ends the session with 421 4.7.0); MAIL parameters SIZE (ASCII
digits only, at most ``server.max_message_size``), BODY=7BIT/8BITMIME and SMTPUTF8,
anything else 555 5.5.4; a bad value 501 5.5.4; the null recipient (501 5.1.3); too
many recipients (452 4.5.3); a bare local part gets ``local.primary_domain``; the loop
guard after DATA (554 5.4.6, ``server.max_received_headers``). VRFY never says whether
a user exists (252 2.5.2). Every 4xx/5xx reply counts towards ``server.max_errors``;
the reply that reaches it is followed by a 421 4.7.0 reply and the end of the session
(Postfix's ``smtpd_hard_error_limit``); a delivered message starts the count again.

TLS and authentication, as the face set the session up (``tls``: STARTTLS can be
offered; ``submission``: a submission port, where AUTH is offered over TLS only and
required before MAIL): STARTTLS (RFC 3207) outside a transaction is `Next.STARTTLS`
(the face's TLS layer writes the 220 and does the handshake); after the handshake
the face calls `Transaction.tls_started` and the session starts again from the
greeting state (§4.2: nothing said before counts). AUTH (RFC 4954) takes PLAIN and
LOGIN; its exchange and the password check are the face's (`Next.AUTH`, then
`Transaction.authenticated` or `Transaction.answer`). Before TLS,
AUTH gets 538 5.7.11; MAIL before AUTH on a submission port 530 5.7.0. An
authenticated user may send only as an address ``owner`` says is theirs: MAIL FROM
553 5.7.1, a From field 550 5.7.1 (RFC 6409 §4.1, as Postfix's
``reject_sender_login_mismatch``). The Received protocol names ESMTPS/ESMTPA/ESMTPSA
(RFC 3848; UTF8SMTP… likewise, RFC 6531).

RFCs: 5321 (commands, sequence, replies, limits §4.5.3.1), 1870 (SIZE), 6152 (8BITMIME),
6531 (SMTPUTF8), 2920 (PIPELINING), 3207 (STARTTLS), 4954 (AUTH), 4616 (PLAIN),
6409 (submission), 3848 (protocol names), 2034 and 3463 (enhanced status codes: every reply
carries one except the greeting, the HELO/EHLO lines and 354).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .envelope import Address, parse_path
from .errors import (
    BYE,
    MESSAGE_TOO_BIG,
    OK,
    RCPT_OK,
    SENDER_OK,
    SYNTAX_ERROR,
    TOO_MANY_RECIPIENTS,
    ProtocolError,
    Reply,
    ReplyError,
)
from .message import LOOP, Content, from_addresses
from .settings import Config

COMMAND_LIMIT = 512  # RFC 5321 §4.5.3.1.4
MAIL_EXTRA = 26 + 10  # what SIZE (RFC 1870) and SMTPUTF8 (RFC 6531) add to MAIL after EHLO
MAX_UNRECOGNIZED = 5  # the fifth unknown command ends the session


class State(enum.Enum):
    CONNECTED = "connected"  # greeted; no HELO or EHLO yet
    READY = "ready"  # HELO/EHLO done; no transaction
    SENDER = "sender"  # MAIL accepted
    RECIPIENTS = "recipients"  # at least one RCPT accepted
    DATA = "data"  # reading the message content
    CLOSED = "closed"  # QUIT answered, or the session ended


class Next(enum.Enum):
    """What the face does after writing a step's replies."""

    COMMAND = "command"  # read the next command line
    CONTENT = "content"  # read message content up to the end-of-data line, then `end_data`
    CLOSE = "close"  # close the connection
    STARTTLS = "starttls"  # do the TLS handshake, then `tls_started` (or close on failure)
    AUTH = "auth"  # do the SASL exchange for `Transaction.auth_request`, then `authenticated`


_ANY = {"HELO": State.READY, "EHLO": State.READY, "QUIT": State.CLOSED}
TRANSITIONS: dict[State, dict[str, State]] = {
    State.CONNECTED: {**_ANY, "RSET": State.CONNECTED, "STARTTLS": State.CONNECTED},
    State.READY: {**_ANY, "RSET": State.READY, "MAIL": State.SENDER, "STARTTLS": State.CONNECTED,
                  "AUTH": State.READY},
    State.SENDER: {**_ANY, "RSET": State.READY, "RCPT": State.RECIPIENTS},
    State.RECIPIENTS: {**_ANY, "RSET": State.READY, "RCPT": State.RECIPIENTS, "DATA": State.DATA},
    State.DATA: {},  # content, not commands; `end_data` leads back to READY
    State.CLOSED: {},
}
STATELESS = frozenset({"NOOP", "VRFY", "HELP"})  # allowed in every command state, change nothing
NOT_IMPLEMENTED = frozenset({"EXPN", "BDAT", "ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML"})

NEED_HELO = Reply(503, "5.5.1", "Send HELO or EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
OUT_OF_SEQUENCE: dict[tuple[State, str], Reply] = {
    (State.CONNECTED, "MAIL"): NEED_HELO,
    (State.CONNECTED, "RCPT"): NEED_HELO,
    (State.CONNECTED, "DATA"): NEED_HELO,
    (State.CONNECTED, "AUTH"): NEED_HELO,
    (State.SENDER, "AUTH"): Reply(503, "5.5.1", "AUTH not allowed in a mail transaction"),
    (State.RECIPIENTS, "AUTH"): Reply(503, "5.5.1", "AUTH not allowed in a mail transaction"),
    (State.READY, "RCPT"): NEED_MAIL,
    (State.READY, "DATA"): NEED_MAIL,
    (State.SENDER, "DATA"): NEED_RCPT,
    (State.SENDER, "MAIL"): NESTED_MAIL,
    (State.RECIPIENTS, "MAIL"): NESTED_MAIL,
}
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")

COMMAND_TOO_LONG = Reply(500, "5.5.2", "Command line too long")
UNRECOGNIZED = Reply(500, "5.5.1", "Command not recognized")
TOO_MANY_UNRECOGNIZED = Reply(421, "4.7.0", "Too many unrecognized commands, closing connection")
UNIMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_COMMAND_BYTES = Reply(501, "5.5.2", "NUL, bare CR or bare LF not allowed in a command line")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
NULL_RCPT = Reply(501, "5.1.3", "Null recipient not allowed")
UNKNOWN_PARAM = Reply(555, "5.5.4", "Parameter not recognized")
BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
BAD_SIZE = Reply(501, "5.5.4", "SIZE must be a number")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
CANNOT_VRFY = Reply(252, "2.5.2", "Cannot VRFY user; try RCPT to attempt delivery")
UNKNOWN_TOPIC = Reply(504, "5.5.4", "HELP topic not known")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")

TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Authentication not enabled")
AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Send EHLO first")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_DONE = Reply(503, "5.5.1", "Already authenticated")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
FROM_NOT_OWNED = Reply(550, "5.7.1", "From: address not owned by the authenticated user")
LOCAL_SENDER_REFUSED = Reply(553, "5.7.1", "Sender address not owned by the local user")
MECHANISMS = ("PLAIN", "LOGIN")

SYNTAX = {
    "HELO": "HELO hostname",
    "EHLO": "EHLO hostname",
    "MAIL": "MAIL FROM:<address> [SP <mail-parameters>]",
    "RCPT": "RCPT TO:<address>",
    "DATA": "DATA",
    "RSET": "RSET",
    "NOOP": "NOOP [ignored]",
    "VRFY": "VRFY <address>",
    "HELP": "HELP [command]",
    "QUIT": "QUIT",
    "STARTTLS": "STARTTLS",
    "AUTH": "AUTH mechanism [initial-response]",
}
_NO_ARGUMENT = {verb: Reply(501, "5.5.4", f"Syntax: {SYNTAX[verb]}") for verb in ("DATA", "RSET", "QUIT", "STARTTLS")}
_NEEDS_ARGUMENT = {verb: Reply(501, "5.5.4", f"Syntax: {SYNTAX[verb]}") for verb in ("HELO", "EHLO", "VRFY")}
_DIGITS = re.compile(r"[0-9]+\Z")  # not str.isdigit(): that takes "²", "١٢" and "１２"

Check = Callable[[Address, str], object]
"""The recipient policy: called with the recipient (domain filled in) and the sender
("" for <>); raises `ReplyError` (usually ``RouteError``) to refuse."""

Owner = Callable[[str, str], bool]
"""May the authenticated user (first argument, the login) send as this address?"""

LocalSender = Callable[[str], bool]
"""May the local user of this session (a uid on this host) use this sender ("" for <>)?"""


@dataclass(frozen=True, slots=True)
class Step:
    """The answer to one command line."""

    replies: tuple[Reply, ...]  # one reply (a multi-line one for EHLO)
    next: Next = Next.COMMAND
    refused: ReplyError | None = None  # the error behind a refusal, for the face's log
    then: Reply | None = None  # a second reply written right after (421 at the error limit)

    @property
    def wire(self) -> bytes:
        """What the face writes for this step."""
        return wire(self.replies) + (wire((self.then,)) if self.then else b"")


@dataclass(frozen=True, slots=True)
class Message:
    """A complete transaction: the envelope and the checked content."""

    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    smtputf8: bool
    helo: str
    protocol: str  # for the Received field: SMTP, ESMTP, UTF8SMTP, with S (TLS) and A (AUTH)
    content: Content
    login: str | None = None  # the authenticated user
    tls: str = ""  # the session's TLS version and cipher ("" in plain text)


def wire(replies: Sequence[Reply]) -> bytes:
    """Replies as they go on the wire: ``250-first`` … ``250 last``, CRLF each."""
    lines = [str(r) for r in replies]
    out = [f"{line[:3]}-{line[4:]}" for line in lines[:-1]] + lines[-1:]
    return "".join(f"{line}\r\n" for line in out).encode("utf-8", "surrogateescape")


_AFTER = {"STARTTLS": Next.STARTTLS, "AUTH": Next.AUTH}  # commands the face completes


class Transaction:
    """One SMTP session's protocol state: HELO, the current transaction, the content.

    ``strict`` is the network face: command lines must end in CRLF and DATA lines are
    checked for bare CR/LF and length. ``check`` is the recipient policy (see `Check`).
    ``tls``: STARTTLS may be offered; ``secured``: the connection is TLS already (implicit
    TLS, its description); ``submission``: AUTH offered over TLS and required, and
    ``owner`` says which sender addresses an authenticated user may use; ``local_sender``
    (a local submission: the UNIX socket, ``sendmail -bs``) which senders the local user may
    use (else MAIL FROM gets 553 5.7.1).
    """

    def __init__(self, config: Config, check: Check, *, strict: bool = True, tls: bool = False,
                 secured: str = "", submission: bool = False, owner: Owner | None = None,
                 local_sender: LocalSender | None = None) -> None:
        self.hostname = config.hostname
        self.max_size = config.server.max_message_size
        self.max_recipients = config.server.max_recipients
        self.max_received = config.server.max_received_headers
        self.primary_domain = config.local.primary_domain
        self.max_errors = config.server.max_errors
        self.check = check
        self.strict = strict
        self.tls_offered = tls
        self.tls = secured
        self.submission = submission
        self.owner = owner
        self.local_sender = local_sender
        self.login: str | None = None
        self.auth_request: tuple[str, str | None] | None = None  # (mechanism, initial response)
        self.state = State.CONNECTED
        self.helo_name = ""
        self.extended = False
        self.unrecognized = 0
        self.errors = 0
        self._reset()

    def _reset(self) -> None:
        self.sender: str | None = None
        self.smtputf8 = False
        self.recipients: list[str] = []
        self.content: Content | None = None

    def greeting(self, ident: str) -> Reply:
        return Reply(220, "", f"{self.hostname} {ident}")

    # -- command lines --------------------------------------------------------------

    def receive(self, line: bytes) -> Step:
        """Decide one command line (with its line ending, if it had one)."""
        if self.state in (State.DATA, State.CLOSED):
            raise RuntimeError(f"command line received in state {self.state.value}")
        bare_lf = False
        if line.endswith(b"\r\n"):
            line = line[:-2]
        elif line.endswith(b"\n"):
            line, bare_lf = line[:-1], self.strict
        verb_bytes, _, arg_bytes = line.partition(b" ")
        if not line.strip() or not verb_bytes.isascii():
            return Step((SYNTAX_ERROR,))
        verb = verb_bytes.decode("ascii").upper()
        limit = COMMAND_LIMIT + (MAIL_EXTRA if verb == "MAIL" and self.extended else 0)
        if len(line) > limit:
            return Step((COMMAND_TOO_LONG,))
        return self._counted(self._decide(verb, arg_bytes, line, bare_lf))

    def _decide(self, verb: str, arg_bytes: bytes, line: bytes, bare_lf: bool) -> Step:
        if verb in NOT_IMPLEMENTED:
            return Step((UNIMPLEMENTED,))
        handler = self._handlers.get(verb)
        if handler is None:
            self.unrecognized += 1
            if self.unrecognized >= MAX_UNRECOGNIZED:
                self.state = State.CLOSED
                return Step((TOO_MANY_UNRECOGNIZED,), Next.CLOSE)
            return Step((UNRECOGNIZED,))
        if bare_lf or b"\x00" in line or b"\r" in line:
            return Step((BAD_COMMAND_BYTES,))
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape")
        try:
            after = self._allowed(verb)
            replies = handler(self, arg)
        except ReplyError as exc:
            return Step((exc.reply,), refused=exc)
        if after is not None:
            self.state = after
        nxt = {State.DATA: Next.CONTENT, State.CLOSED: Next.CLOSE}.get(self.state, Next.COMMAND)
        return Step(replies, _AFTER.get(verb, nxt))

    def _counted(self, step: Step) -> Step:
        """Count an error reply towards ``max_errors``; the one that reaches it ends the session."""
        if not step.replies or step.replies[0].code < 400 or step.next is Next.CLOSE:
            return step
        self.errors += 1
        if self.errors < self.max_errors:
            return step
        self.state = State.CLOSED
        return Step(step.replies, Next.CLOSE, step.refused, TOO_MANY_ERRORS)

    def overlong(self) -> Step:
        """A command line too long even to be read whole (the face skipped it)."""
        return self._counted(Step((COMMAND_TOO_LONG,)))

    def answer(self, reply: Reply, *, sent: bool = False) -> Step:
        """A reply the face decided (the end of DATA, an AUTH result), counted like the
        core's own: a delivered message (2xx after DATA) starts the error count again.
        ``sent``: the face has written the reply itself; the Step holds only what follows."""
        if reply.code < 400:
            if reply.code == 250:
                self.errors = 0
            return Step(() if sent else (reply,))
        step = self._counted(Step((reply,)))
        return Step((), step.next, then=step.then) if sent else step

    def tls_started(self, description: str) -> None:
        """The STARTTLS handshake succeeded: back to the greeting state (RFC 3207 §4.2)."""
        self._reset()
        self.state = State.CONNECTED
        self.helo_name = ""
        self.extended = False
        self.login, self.auth_request = None, None  # (AUTH needs TLS first: nothing to forget today)
        self.tls = description

    def authenticated(self, login: str) -> Step:
        """The face checked the credentials of `auth_request`: ``login`` is the user."""
        self.login = login
        self.auth_request = None
        return Step((AUTH_OK,))

    def _allowed(self, verb: str) -> State | None:
        """The state after ``verb`` succeeds (None: unchanged), or the sequence error."""
        if verb in STATELESS:
            return None
        after = TRANSITIONS[self.state].get(verb)
        if after is None:
            raise ProtocolError(OUT_OF_SEQUENCE.get((self.state, verb), BAD_SEQUENCE),
                                f"{verb} in state {self.state.value}")
        return after

    # -- the commands (each returns its replies or raises ReplyError) ------------------

    def helo(self, name: str) -> tuple[Reply, ...]:
        return self._greet("HELO", name)

    def ehlo(self, name: str) -> tuple[Reply, ...]:
        replies = self._greet("EHLO", name)
        extensions = [f"SIZE {self.max_size}", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"]
        if self.tls_offered and not self.tls:
            extensions.append("STARTTLS")
        if self.submission and self.tls and self.login is None:
            extensions.append("AUTH " + " ".join(MECHANISMS))
        return (*replies, *(Reply(250, "", ext) for ext in extensions))

    def _greet(self, verb: str, name: str) -> tuple[Reply, ...]:
        if not name:
            raise ProtocolError(_NEEDS_ARGUMENT[verb])
        self._reset()
        self.helo_name = name
        self.extended = verb == "EHLO"
        return (Reply(250, "", self.hostname),)

    def mail(self, arg: str) -> tuple[Reply, ...]:
        if self.submission and self.login is None:
            raise ProtocolError(AUTH_REQUIRED, "MAIL before AUTH")
        if arg[:5].upper() != "FROM:":
            raise ProtocolError(MAIL_SYNTAX)
        address, params = parse_path(arg[5:], smtputf8=False)
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _DIGITS.match(value):
                    raise ProtocolError(BAD_SIZE, f"SIZE={value!r}")
                if int(value) > self.max_size:
                    raise ProtocolError(MESSAGE_TOO_BIG, f"SIZE={value}")
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    raise ProtocolError(BAD_BODY, f"BODY={value!r}")
            elif key != "SMTPUTF8" or value is not None:
                raise ProtocolError(UNKNOWN_PARAM, f"MAIL parameter {key}")
        if address is not None and not address.domain and self.local_sender is not None:
            address = Address(address.local, self.primary_domain, address.quoted)  # a local submission
        self.sender = str(address) if address else ""
        if self.login is not None and self.sender and not self._owns(self.sender):
            raise ProtocolError(SENDER_NOT_OWNED, f"{self.login} may not send as {self.sender}")
        if self.local_sender is not None and not self.local_sender(self.sender):
            raise ProtocolError(LOCAL_SENDER_REFUSED, f"the local user may not send as {self.sender}")
        self.smtputf8 = "SMTPUTF8" in params
        return (SENDER_OK,)

    def _owns(self, address: str) -> bool:
        return self.owner is not None and self.login is not None and self.owner(self.login, address)

    def rcpt(self, arg: str) -> tuple[Reply, ...]:
        if arg[:3].upper() != "TO:":
            raise ProtocolError(RCPT_SYNTAX)
        address, params = parse_path(arg[3:], smtputf8=self.smtputf8)
        if address is None:
            raise ProtocolError(NULL_RCPT)
        if params:
            raise ProtocolError(UNKNOWN_PARAM, f"RCPT parameters {sorted(params)}")
        if len(self.recipients) >= self.max_recipients:
            raise ProtocolError(TOO_MANY_RECIPIENTS)
        address = Address(address.local, address.domain or self.primary_domain, address.quoted)
        self.check(address, self.sender or "")
        rcpt = str(address)
        if rcpt not in self.recipients:
            self.recipients.append(rcpt)
        return (RCPT_OK,)

    def data(self, arg: str) -> tuple[Reply, ...]:
        if arg:
            raise ProtocolError(_NO_ARGUMENT["DATA"])
        self.content = Content(self.max_size, strict=self.strict)
        return (START_DATA,)

    def rset(self, arg: str) -> tuple[Reply, ...]:
        if arg:
            raise ProtocolError(_NO_ARGUMENT["RSET"])
        self._reset()
        return (OK,)

    def noop(self, arg: str) -> tuple[Reply, ...]:
        return (OK,)

    def vrfy(self, arg: str) -> tuple[Reply, ...]:
        if not arg:
            raise ProtocolError(_NEEDS_ARGUMENT["VRFY"])
        return (CANNOT_VRFY,)  # never says whether a user exists

    def help(self, arg: str) -> tuple[Reply, ...]:
        if not arg:
            return (Reply(214, "2.0.0", "Supported commands: " + " ".join(sorted(SYNTAX))),)
        topic = arg.split()[0].upper()
        if topic not in SYNTAX:
            raise ProtocolError(UNKNOWN_TOPIC)
        return (Reply(214, "2.0.0", f"Syntax: {SYNTAX[topic]}"),)

    def quit(self, arg: str) -> tuple[Reply, ...]:
        if arg:
            raise ProtocolError(_NO_ARGUMENT["QUIT"])
        return (BYE,)

    def starttls(self, arg: str) -> tuple[Reply, ...]:
        if not self.tls_offered and not self.tls:
            raise ProtocolError(UNIMPLEMENTED)
        if self.tls:
            raise ProtocolError(TLS_ACTIVE)
        if arg:
            raise ProtocolError(_NO_ARGUMENT["STARTTLS"])
        return ()  # the face's TLS layer writes the 220 and does the handshake

    def auth(self, arg: str) -> tuple[Reply, ...]:
        if not self.submission:
            raise ProtocolError(AUTH_NOT_ENABLED)
        if not self.extended:
            raise ProtocolError(AUTH_NEEDS_EHLO)
        if not self.tls:
            raise ProtocolError(AUTH_NEEDS_TLS, "AUTH before STARTTLS")
        if self.login is not None:
            raise ProtocolError(AUTH_DONE)
        words = arg.split()
        if not 1 <= len(words) <= 2:
            raise ProtocolError(AUTH_SYNTAX)
        mechanism = words[0].upper()
        if mechanism not in MECHANISMS:
            raise ProtocolError(AUTH_MECHANISM, f"AUTH {mechanism[:20]}")
        self.auth_request = (mechanism, words[1] if len(words) == 2 else None)
        return ()

    _handlers: dict[str, Callable[[Transaction, str], tuple[Reply, ...]]] = {
        "HELO": helo, "EHLO": ehlo, "MAIL": mail, "RCPT": rcpt, "DATA": data, "RSET": rset,
        "NOOP": noop, "VRFY": vrfy, "HELP": help, "QUIT": quit, "STARTTLS": starttls, "AUTH": auth,
    }

    # -- the end of DATA ---------------------------------------------------------------

    def end_data(self) -> Message | Reply:
        """The content has been read to its end: the `Message`, or the refusal. Either
        way the transaction is over and the session is READY for the next one."""
        if self.state is not State.DATA or self.content is None:
            raise RuntimeError(f"end of data in state {self.state.value}")
        content, sender, recipients, smtputf8 = self.content, self.sender or "", self.recipients, self.smtputf8
        self._reset()
        self.state = State.READY
        try:
            content.finish()
        except ReplyError as exc:
            return exc.reply
        if content.received > self.max_received:
            return LOOP
        if self.login is not None and not all(map(self._owns, from_addresses(content.header))):
            return FROM_NOT_OWNED
        protocol = "SMTP"
        if self.extended:
            protocol = ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if self.tls else "") + ("A" if self.login else "")
        return Message(sender, tuple(recipients), smtputf8, self.helo_name, protocol, content,
                       self.login, self.tls)
