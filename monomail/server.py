"""The SMTP face: aiosmtpd's connections, monomail's SMTP core, in monomail's own event loop.

Job: listen on every ``server.listen`` address, read command lines and message content
from each client, and write back what the transaction core (``transaction``) decides;
``policy`` is its recipient check. A complete message gets our Received header and goes
to ``queue.accept``, whose reply is the answer to DATA. The server ends at
``queue.accept()``. Connections beyond ``server.max_connections`` get ``421 4.7.0``.

What this module does not do: decide anything about a command (``transaction``), check
message content (``message.Content``), route (``policy``/``router``), deliver (``queue``).

Reading (DESIGN invariant 9, nothing proportional to a message's size runs on the event
loop in one piece): command lines are read up to LF, one at a time; the content after
354 is read in pieces up to each ``.<CR><LF>`` (or a buffer's worth), checked as it comes
by ``message.Content``, and joined (one copy of the whole message) in a worker thread.
The end of data is a line holding just ``.``, i.e. ``<CR><LF>.<CR><LF>``: a bare LF or
CR before the dot does not end it (SMTP smuggling), and the content is refused.

Error handling: an exception nobody classified answers ``451 4.3.0`` with generic text
and is logged with its traceback (aiosmtpd's default leaks the exception text and
answers a permanent 500); one raised while message content is being read also closes
the connection, since the client's stream cannot be trusted to be at a command then.

Security stance: no relay for untrusted clients (``policy``); client words reach headers
only through ``message.safe_word`` and the log only through ``maillog.printable``
(aiosmtpd's own logger, ``mail.log``, gets a filter that escapes its lines); replies
never carry causes.

aiosmtpd is imported here and nowhere else. Its ``Controller`` runs a second loop in a
thread, so `SMTPServer` calls ``loop.create_server`` itself with our `Session`, an
``aiosmtpd.smtp.SMTP``. What monomail takes from aiosmtpd, public API first:

- ``SMTP.__init__`` (hostname, timeout, loop), ``push`` (one write + drain per step),
  ``connection_made``/``connection_lost`` (asyncio protocol methods we extend; STARTTLS
  is not offered, so each is called once per connection), and the documented
  ``line_length_limit`` (1001), which is the StreamReader's limit: longer command lines
  are skipped and refused.

aiosmtpd internals monomail depends on (no public way exists; tested with aiosmtpd
1.4.6, and ``pyproject.toml`` pins ``>=1.4.6,<1.5``):

1. ``SMTP._handle_client`` is replaced by `Session._handle_client`: aiosmtpd starts it
   as the connection's task in ``connection_made`` and cancels it in
   ``connection_lost``/``eof_received``. Its own command parsing and ``smtp_*``
   methods are not used at all.
2. ``SMTP._reader``: the connection's ``asyncio.StreamReader``, set by
   ``SMTP._cb_client_connected``.
3. ``SMTP._reset_timeout()``: restarts aiosmtpd's idle timer (``server.timeout``);
   called after each accepted command and at most once a second while content is read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from aiosmtpd.smtp import SMTP

from . import maillog, policy
from .envelope import Address, Envelope, new_id
from .errors import LOCAL_ERROR, TOO_MANY_CONNECTIONS, Reply, RouteError
from .message import received_header
from .queue import Queue
from .router import Tables
from .settings import Config
from .transaction import Message, Next, Step, Transaction, wire

log = logging.getLogger("monomail.smtp")
IDENT = "ESMTP monomail"
END_LINE = b".\r\n"
JOIN_IN_THREAD = 256 * 1024  # content larger than this is joined in a worker thread
YIELD_EVERY = 256  # content pieces read without a pause for other sessions at most

_AIOSMTPD_LOG = logging.getLogger("mail.log")
_AIOSMTPD_LOG.setLevel(logging.WARNING)  # aiosmtpd logs every connection at INFO
if not any(isinstance(f, maillog.PrintableFilter) for f in _AIOSMTPD_LOG.filters):
    _AIOSMTPD_LOG.addFilter(maillog.PrintableFilter())


class _NoHooks:
    """aiosmtpd's handler object: monomail uses none of its hooks (the core decides)."""


class Session(SMTP):
    """One SMTP connection: aiosmtpd's protocol object, our command loop."""

    def __init__(self, server: SMTPServer) -> None:
        self.mm = server
        cfg = server.config
        self.peer_ip = "127.0.0.1"
        self.trusted = False
        super().__init__(  # size, SMTPUTF8, the greeting are the core's: aiosmtpd's own commands are unused
            _NoHooks(),
            hostname=cfg.hostname,  # else aiosmtpd asks socket.getfqdn() on every connection
            timeout=cfg.server.timeout,
            loop=server.loop,
        )
        self.core = Transaction(cfg, self._check_recipient)

    def _check_recipient(self, address: Address, sender: str) -> object:
        return policy.check_recipient(address, self.mm.config, trusted=self.trusted, sender=sender,
                                      tables=self.mm.tables)

    # -- connection bookkeeping ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.mm.sessions) >= self.mm.config.server.max_connections:
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(wire((TOO_MANY_CONNECTIONS,)))
            transport.close()
            return
        self.mm.sessions.add(self)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        self.trusted = policy.is_trusted(self.peer_ip, self.mm.config)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self not in self.mm.sessions:  # refused above: aiosmtpd never saw it
            return
        self.mm.sessions.discard(self)
        super().connection_lost(error)

    # -- the command loop (replaces aiosmtpd's, internal 1) -----------------------

    async def _handle_client(self) -> None:
        try:
            await self._send((self.core.greeting(IDENT),))
            while self.transport is not None:
                step = await self._next_command()
                await self._send(step.replies)
                if step.next is Next.CONTENT:
                    if not await self._read_content():
                        return
                    await self._send((await self._finish_message(),))
                elif step.next is Next.CLOSE:
                    self.hang_up()
                    return
        except asyncio.CancelledError:  # aiosmtpd's connection_lost / eof_received
            self.hang_up()
            raise
        except (ConnectionError, asyncio.IncompleteReadError):  # the client went away
            self.hang_up()
        except Exception as exc:  # a bug of ours: this connection ends, the others go on
            log.error("internal error in SMTP session with [%s]: %r", self.peer_ip, exc, exc_info=exc)
            self.hang_up()

    async def _next_command(self) -> Step:
        reader = self._reader  # internal 2
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:  # longer than line_length_limit: skip it
            await reader.read(exc.consumed)
            while True:
                try:
                    await reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await reader.read(more.consumed)
            return self.core.overlong()
        try:
            step = self.core.receive(line)
        except Exception as exc:  # nobody classified it: temporary
            log.error("internal error in SMTP session with [%s]: %r", self.peer_ip, exc, exc_info=exc)
            return Step((LOCAL_ERROR,))
        if isinstance(step.refused, RouteError):
            log.info("refused %s client=[%s]: %s", maillog.printable(line[:300].rstrip(b"\r\n")),
                     self.peer_ip, maillog.printable(step.refused.detail))
        if step.replies[0].code < 400:
            self._reset_timeout()  # internal 3
        return step

    async def _read_content(self) -> bool:
        """Read the content to the end-of-data line, feeding the core's `Content`; False
        (connection closed) if something went wrong that nobody classified."""
        content = self.core.content
        assert content is not None
        reader = self._reader
        tail = b"\r\n"  # the content begins at the start of a line
        pieces = 0
        reset_at = self.loop.time() + 1.0
        try:
            while True:
                try:
                    piece = await reader.readuntil(END_LINE)
                except asyncio.LimitOverrunError as exc:  # no ".\r\n" in a buffer's worth
                    piece = await reader.read(exc.consumed)
                else:
                    before = piece[-5:-3] if len(piece) >= 5 else (tail + piece[:-3])[-2:]
                    if before == b"\r\n":  # CRLF . CRLF: the end (that CRLF ends the last line)
                        content.feed(piece[:-3])
                        break
                content.feed(piece)
                tail = piece[-2:]
                pieces += 1
                if self.loop.time() > reset_at:
                    self._reset_timeout()  # internal 3
                    reset_at = self.loop.time() + 1.0
                if pieces % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # many short pieces: let the other sessions in
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception as exc:
            log.error("internal error reading DATA from [%s]: %r", self.peer_ip, exc, exc_info=exc)
            await self._send((LOCAL_ERROR,))
            self.hang_up()
            return False
        self._reset_timeout()
        return True

    async def _finish_message(self) -> Reply:
        try:
            result = self.core.end_data()
            if isinstance(result, Reply):
                log.info("refused DATA from [%s]: %s", self.peer_ip, result)
                return result
            return await self._accept(result)
        except Exception as exc:  # nobody classified it: temporary
            log.error("internal error after DATA from [%s]: %r", self.peer_ip, exc, exc_info=exc)
            return LOCAL_ERROR

    async def _accept(self, msg: Message) -> Reply:
        cfg = self.mm.config
        now = time.time()
        qid = new_id(now)
        rcpts = msg.recipients
        header = received_header(
            helo=msg.helo, peer_ip=self.peer_ip, hostname=cfg.hostname, protocol=msg.protocol,
            queue_id=qid, recipient=rcpts[0] if len(rcpts) == 1 else None, when=now,
        )
        if msg.content.size > JOIN_IN_THREAD:
            data = await asyncio.to_thread(msg.content.join, header)
        else:
            data = msg.content.join(header)
        env = Envelope(qid, msg.sender, rcpts, now, msg.smtputf8, len(data))
        maillog.received(env, client=self.peer_ip, helo=msg.helo)
        return await self.mm.queue.accept(env, data)

    async def _send(self, replies: tuple[Reply, ...]) -> None:
        await self.push(wire(replies)[:-2])  # push adds the last CRLF

    def hang_up(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SMTPServer:
    """Listens on every ``server.listen`` address; owns the sessions."""

    def __init__(self, config: Config, queue: Queue, tables: Tables | None = None) -> None:
        self.config = config
        self.queue = queue
        self.tables = tables
        self.sessions: set[Session] = set()
        self.servers: list[asyncio.Server] = []
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
            session.hang_up()
        for s in self.servers:
            await s.wait_closed()
