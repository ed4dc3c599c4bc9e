"""The SMTP face: aiosmtpd's protocol, started in monomail's own event loop.

Job: speak SMTP (RFC 5321) with ESMTP extensions SIZE (RFC 1870), 8BITMIME (RFC 6152),
SMTPUTF8 (RFC 6531), PIPELINING (RFC 2920) and ENHANCEDSTATUSCODES (RFC 2034/3463);
ask ``policy`` about every MAIL and RCPT; check DATA with ``message.canonicalize``;
prepend our Received header; hand the message to ``queue.accept`` and answer what it
says. The server ends at ``queue.accept()``.

aiosmtpd is imported here and nowhere else. Its ``Controller`` runs a second loop in a
thread, so `SMTPServer` calls ``loop.create_server`` itself. What we change in its
``SMTP`` class, and why:

- MAIL and RCPT are parsed by ``envelope.parse_path`` (null sender, source routes,
  quoted local parts, UTF-8 checks, ESMTP parameters) instead of aiosmtpd's parser.
- Every reply carries an enhanced status code: aiosmtpd's own replies lacking one get
  a fitting default in `_enhance` (greeting, EHLO/HELO lines and 354 excepted).
- ``handle_exception`` answers ``451 4.3.0`` with generic text and logs the cause;
  aiosmtpd's default leaks the exception and answers a permanent 500.
- A NUL, CR or LF inside a command line is refused (``501 5.5.2``); command lines are
  limited to 512 octets per session (aiosmtpd's limits table is a class attribute that
  grows with every EHLO; here it is per session and reset by EHLO).
- Connections beyond ``server.max_connections`` get ``421 4.7.0`` and are closed.

Security stance: no relay for untrusted clients (``policy``), client words reach
headers only through ``message.safe_word``, and replies never carry causes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import socket
import time
from typing import Any

from aiosmtpd.smtp import SMTP, syntax
from aiosmtpd.smtp import Envelope as _AioEnvelope

from . import maillog, policy
from .envelope import Address, Envelope, new_id, parse_path
from .errors import (
    LOCAL_ERROR,
    MESSAGE_TOO_BIG,
    RCPT_OK,
    SENDER_OK,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_RECIPIENTS,
    AddressError,
    Reply,
    ReplyError,
    RouteError,
)
from .message import LINE_TOO_LONG as DATA_LINE_TOO_LONG
from .message import LOOP, canonicalize, count_received, received_header
from .queue import Queue
from .router import Tables
from .settings import Config

log = logging.getLogger("monomail.smtp")
logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO

COMMAND_LIMIT = 512  # RFC 5321 §4.5.3.1.4
_HAS_STATUS = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_DEFAULT_STATUS = {
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}
_REWRITE = {
    "552 Error: Too much mail data": str(MESSAGE_TOO_BIG),
    "500 Line too long (see RFC5321 4.5.3.1.6)": str(DATA_LINE_TOO_LONG),
    "500 Command line too long": "500 5.5.2 Command line too long",
}
BAD_COMMAND_BYTES = Reply(501, "5.5.2", "NUL, bare CR or bare LF not allowed in a command line")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
NULL_RCPT = Reply(501, "5.1.3", "Null recipient not allowed")
UNKNOWN_PARAM = Reply(555, "5.5.4", "Parameter not recognized")
BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
BAD_SIZE = Reply(501, "5.5.4", "SIZE must be a number")


def _enhance(status: str) -> str:
    """Give one of aiosmtpd's own replies an enhanced status code (RFC 2034)."""
    if status in _REWRITE:
        return _REWRITE[status]
    if len(status) < 4 or not status[:3].isdigit() or _HAS_STATUS.match(status):
        return status
    code = int(status[:3])
    if code in (220, 354):
        return status
    enhanced = "5.5.1" if "not recognized" in status else _DEFAULT_STATUS.get(code, f"{status[0]}.0.0")
    return f"{status[:4]}{enhanced} {status[4:]}"


class _LineReader(asyncio.StreamReader):
    """aiosmtpd reads command lines up to a bare LF; this notes when one ended without CR,
    so the command can be refused (as Postfix's smtpd_forbid_bare_newline does)."""

    bare_lf = False

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        line = await super().readuntil(separator)
        self.bare_lf = separator == b"\n" and not line.endswith(b"\r\n")
        return line


class _SessionEnvelope(_AioEnvelope):
    """aiosmtpd's envelope plus what monomail tracks for one transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.sender: str | None = None
        self.smtputf8 = False


class Session(SMTP):
    """One SMTP connection."""

    def __init__(self, server: SMTPServer) -> None:
        self.mm = server
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_LIMIT)
        self.command_size_limit = COMMAND_LIMIT
        self._raw_replies = False
        self._counted = False
        cfg = server.config
        super().__init__(
            server.handler,
            data_size_limit=cfg.server.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.hostname,
            ident="ESMTP monomail",
            timeout=cfg.server.timeout,
            loop=server.loop,
        )
        self._stream_reader.__class__ = _LineReader

    def _create_envelope(self) -> _SessionEnvelope:
        return _SessionEnvelope()

    # -- connection bookkeeping ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._counted or self.transport is not None:  # STARTTLS re-entry
            super().connection_made(transport)
            return
        if len(self.mm.sessions) >= self.mm.config.server.max_connections:
            transport.write(f"{TOO_MANY_CONNECTIONS}\r\n".encode())  # type: ignore[attr-defined]
            transport.close()
            return
        self._counted = True
        self.mm.sessions.add(self)
        super().connection_made(transport)
        peer = self.session.peer
        self.session.peer_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        self.session.trusted = policy.is_trusted(self.session.peer_ip, self.mm.config)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._counted:
            return
        self.mm.sessions.discard(self)
        super().connection_lost(error)

    # -- replies ------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            if not self._raw_replies:
                status = _enhance(status)
            elif status == "250 HELP":  # the last EHLO line: our extensions instead
                await super().push("250-PIPELINING")
                status = "250 ENHANCEDSTATUSCODES"
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self.command_size_limits.clear()
        self._raw_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    # -- MAIL and RCPT ------------------------------------------------------------

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        env: _SessionEnvelope = self.envelope  # type: ignore[assignment]
        if env.sender is not None:
            await self.push(str(NESTED_MAIL))
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self.push(str(MAIL_SYNTAX))
            return
        try:
            address, params = parse_path(arg[5:], smtputf8=False)
        except AddressError as exc:
            await self.push(str(exc.reply))
            return
        reply = self._check_mail_params(params)
        if reply:
            await self.push(str(reply))
            return
        env.sender = str(address) if address else ""
        env.mail_from = env.sender
        env.smtputf8 = "SMTPUTF8" in params
        env.mail_options = [k if v is None else f"{k}={v}" for k, v in params.items()]
        await self.push(str(SENDER_OK))

    def _check_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                if not value or not value.isdigit():
                    return BAD_SIZE
                if int(value) > self.mm.config.server.max_message_size:
                    return MESSAGE_TOO_BIG
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return BAD_BODY
            elif key == "SMTPUTF8":
                if value is not None:
                    return UNKNOWN_PARAM
            else:
                return UNKNOWN_PARAM
        return None

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        env: _SessionEnvelope = self.envelope  # type: ignore[assignment]
        if env.sender is None:
            await self.push(str(NEED_MAIL))
            return
        if not arg or arg[:3].upper() != "TO:":
            await self.push(str(RCPT_SYNTAX))
            return
        cfg = self.mm.config
        try:
            address, params = parse_path(arg[3:], smtputf8=env.smtputf8)
            if address is None:
                raise AddressError(NULL_RCPT)
            if params:
                raise AddressError(UNKNOWN_PARAM)
            if len(env.rcpt_tos) >= cfg.server.max_recipients:
                raise ReplyError(TOO_MANY_RECIPIENTS)
            if not address.domain:
                address = Address(address.local, cfg.local.primary_domain, address.quoted)
            policy.check_recipient(address, cfg, trusted=self.session.trusted, sender=env.sender,
                                   tables=self.mm.tables)
        except ReplyError as exc:
            if isinstance(exc, RouteError):
                log.info("refused rcpt=<%s> client=[%s]: %s", arg[3:].strip()[:300],
                         self.session.peer_ip, exc.detail)
            await self.push(str(exc.reply))
            return
        rcpt = str(Address(address.local, address.domain, address.quoted))
        if rcpt not in env.rcpt_tos:
            env.rcpt_tos.append(rcpt)
        await self.push(str(RCPT_OK))


def _guarded(method: Any) -> Any:
    """Wrap an ``smtp_*`` command method: refuse a line with NUL, bare CR or bare LF."""

    @functools.wraps(method)
    async def guarded(self: Session, arg: str | None) -> None:
        if self._reader.bare_lf or (arg and ("\x00" in arg or "\r" in arg)):
            await self.push(str(BAD_COMMAND_BYTES))
            return
        await method(self, arg)

    return guarded


# Done once here rather than per connection: aiosmtpd collects smtp_* methods in __init__.
for _name in [n for n in dir(Session) if n.startswith("smtp_")]:
    setattr(Session, _name, _guarded(getattr(Session, _name)))


class Handler:
    """aiosmtpd's hook object: EHLO extensions, DATA, and exceptions."""

    def __init__(self, server: SMTPServer) -> None:
        self.mm = server

    async def handle_DATA(self, smtp: Session, session: Any, envelope: _SessionEnvelope) -> str:
        cfg = self.mm.config
        try:
            data = canonicalize(envelope.original_content or b"")
        except ReplyError as exc:
            log.info("refused DATA from [%s]: %s", session.peer_ip, exc.reply.text)
            return str(exc.reply)
        if count_received(data) > cfg.server.max_received_headers:
            return str(LOOP)
        now = time.time()
        qid = new_id(now)
        rcpts = tuple(envelope.rcpt_tos)
        helo = session.host_name or "unknown"
        protocol = ("UTF8SMTP" if envelope.smtputf8 else "ESMTP") if session.extended_smtp else "SMTP"
        header = received_header(
            helo=helo, peer_ip=session.peer_ip, hostname=cfg.hostname, protocol=protocol,
            queue_id=qid, recipient=rcpts[0] if len(rcpts) == 1 else None, when=now,
        )
        data = header + data
        env = Envelope(qid, envelope.sender or "", rcpts, now, envelope.smtputf8, len(data))
        maillog.received(env, client=session.peer_ip, helo=helo)
        reply = await self.mm.queue.accept(env, data)
        return str(reply)

    async def handle_exception(self, error: Exception) -> str:
        log.error("internal error in SMTP session: %r", error, exc_info=error)
        return str(LOCAL_ERROR)


class SMTPServer:
    """Listens on every ``server.listen`` address; owns the sessions."""

    def __init__(self, config: Config, queue: Queue, tables: Tables | None = None) -> None:
        self.config = config
        self.queue = queue
        self.tables = tables
        self.handler = Handler(self)
        self.sessions: set[Session] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for addr in self.config.server.listen:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_UNSPEC
            server = await self.loop.create_server(
                lambda: Session(self), host=addr.host, port=addr.port, family=family,
                reuse_address=True, backlog=512,
            )
            self.servers.append(server)
            log.info("listening on %s", addr)

    @property
    def ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self.servers if s.sockets]

    async def close(self, grace: float) -> None:
        """Stop accepting; let sessions finish for up to ``grace`` seconds; close the rest."""
        for s in self.servers:
            s.close()
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for s in self.servers:
            await s.wait_closed()
