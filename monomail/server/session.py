"""One SMTP connection: an ``asyncio.Protocol`` that reads, asks the transaction core, writes.

Job: the bytes of one client connection. Command lines are decided as they arrive, in
``data_received`` itself (`transaction.Transaction.receive` is pure and quick): a pipelining
client's commands are answered together, in one write. No task runs for a connection
that waits for its client; one is started only for what must wait on something else (the
end of a message: ``queue.accept``; an AUTH exchange and its password check; a TLS
handshake), and the input that arrives meanwhile waits in the buffer. Message content is
fed to the core's ``message.Content`` piece by piece as it arrives (``smtpread.EndOfData``).
Deadlines are kept as times on the session and enforced by the server's sweeper
(`Session.expire`), so an idle connection costs no timer and no task.

What it decides: nothing about a command (``transaction``), nothing about a recipient
(``policy``). What it writes: the core's replies, and its own for the face's matters (the
deadlines, an internal error: 451 4.3.0, and the STARTTLS go-ahead).

TLS (``tls``): STARTTLS (RFC 3207) is offered when ``[tls]`` is set; after the core says
go, the session writes ``220 2.0.0 Ready to start TLS``, discards whatever plain text was
pipelined behind the command (§5, the command injection family) and reads nothing more
until ``loop.start_tls`` has done the handshake. On the implicit-TLS port (RFC 8314) the
handshake comes first. AUTH PLAIN and LOGIN (RFC 4954, 4616): ``authexchange``.

RFCs: 5321 (the session), 2920 (PIPELINING: replies in order, one write per batch),
3207, 8314, 4954.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from .. import maillog, policy
from ..envelope import Address
from ..errors import LOCAL_ERROR, Reply, RouteError
from ..localpeer import LocalPeer, peer_of
from ..smtpread import INCOMPLETE, OVERLONG, EndOfData, LineReader
from ..tls import describe
from ..transaction import Next, Step, Transaction, wire
from .authexchange import COMMAND_TIMEOUT, AuthExchange
from .finish import finish_message
from .host import Host

log = logging.getLogger("monomail.smtp")
IDENT = "ESMTP monomail"
MX, SUBMISSION, SUBMISSIONS, LOCAL = "mx", "submission", "submissions", "local"  # the kinds of listener
SLICE = 16 * 1024  # content checked in one go before the other sessions get their turn
HIGH_WATER = 256 * 1024  # input buffered while a task runs (or replies unread) before reading pauses

DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout reading message data, closing connection")
TLS_GO_AHEAD = b"220 2.0.0 Ready to start TLS\r\n"

_COMMAND, _CONTENT, _BUSY, _CLOSED = 0, 1, 2, 3  # what the session is doing (`Session.mode`)


class Session(AuthExchange, asyncio.Protocol):
    """One SMTP connection (the AUTH exchange: `AuthExchange`)."""

    __slots__ = ("mm", "kind", "cfg", "tables", "auth", "certs", "peer_ip", "session_id", "client",
                 "trusted", "local", "core", "transport", "mode", "buf", "lines", "eod", "deadline",
                 "last_read", "eof", "paused", "waiter", "task", "_writing_paused")

    def __init__(self, server: Host, kind: str = MX) -> None:
        self.mm = server
        self.kind = kind
        self.cfg, self.tables, self.auth = server.config, server.tables, server.auth
        self.certs = server.certificates  # the settings taken once: a reload is for new sessions
        self.peer_ip = "127.0.0.1"
        self.session_id = ""  # on this connection's lines (maillog.SESSION), once admitted
        self.client = ""  # the limits' key for this client (limits.client_key)
        self.trusted = False
        self.local: LocalPeer | None = None  # the user on a local socket (SO_PEERCRED)
        self.core: Transaction | None = None
        self.transport: asyncio.Transport | None = None
        self.mode = _CLOSED
        self.buf = bytearray()
        self.lines = LineReader()
        self.eod: EndOfData | None = None
        self.deadline = 0.0  # (monotonic) the command or the DATA phase must be done by then
        self.last_read = 0.0  # (monotonic) the client's last byte
        self.eof = False
        self.paused = False  # reading paused (by us, not the TLS layer)
        self.waiter: asyncio.Future[None] | None = None  # a task waiting for input
        self.task: asyncio.Task[None] | None = None
        self._writing_paused = False

    # -- the core and its policy callbacks --------------------------------------------

    def _new_core(self) -> Transaction:
        kind = self.kind
        return Transaction(self.cfg, self._check_recipient, tls=self.certs is not None and kind != LOCAL,
                           submission=kind in (SUBMISSION, SUBMISSIONS), owner=self._owns,
                           local_sender=self._local_sender if kind == LOCAL else None)

    def _check_recipient(self, address: Address, sender: str) -> object:
        core = self.core
        return policy.check_recipient(address, self.cfg, trusted=self.trusted or (core is not None and
                                                                                  core.login is not None),
                                      sender=sender, tables=self.tables)

    def _owns(self, login: str, address: str) -> bool:
        return policy.owns(login, address, self.cfg, self.tables)

    def _local_sender(self, sender: str) -> bool:
        peer = self.local
        return peer is not None and policy.local_sender(sender, peer.name, peer.trusted, self.cfg)

    # -- asyncio's protocol methods ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # (uvloop's UNIX transport is not a subclass)
        self._session_lines()  # none yet (uvloop: one context for a listener's connections, the last id in it)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        if self.kind == LOCAL:
            self.local = peer_of(transport.get_extra_info("socket"), self.cfg)
            self.peer_ip = f"local:{self.local.label if self.local else 'unknown'}"
            if self.local is None:  # no peer credentials: nobody to speak for
                transport.close()
                return
        refusal = self.mm.admit(self)
        if refusal is not None:
            if self.kind != SUBMISSIONS:  # (on 465 plain text would only garble the handshake)
                transport.write(wire((refusal,)))
            transport.close()
            return
        self.session_id = maillog.new_session_id()
        self.last_read = now = time.monotonic()
        if self.kind == SUBMISSIONS:  # implicit TLS: counted above, before the handshake
            transport.pause_reading()  # the ClientHello is for the TLS layer, not for us
            self._busy(self._implicit_tls(transport))
            return
        self.transport = transport
        self.core = core = self._new_core()
        self.mode = _COMMAND
        self.deadline = now + self.cfg.server.command_timeout
        self._write(self.mm.greeting(core))

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self._session_lines()
        mode = self.mode
        if mode == _CONTENT:
            self._content(data)
        elif mode == _COMMAND:
            self.buf += data
            self._commands()
        elif mode == _BUSY:
            self.buf += data
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)
            if len(self.buf) > HIGH_WATER and self.waiter is None:
                self._pause()

    def eof_received(self) -> bool:
        self.eof = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("the client closed its side"))
        return self.mode == _BUSY  # keep the transport for the reply being made; else close

    def connection_lost(self, error: Exception | None) -> None:
        self.mode = _CLOSED
        self.transport = None
        self.mm.release(self)  # once per session: it does nothing the second time
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("the client went away"))

    def pause_writing(self) -> None:  # the client does not read its replies: stop reading its commands
        self._writing_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.mode != _BUSY or self.waiter is not None:  # (a task waiting for input: the AUTH exchange)
            self._resume()
        if self.mode == _COMMAND and self.buf:  # the lines read while the replies waited
            self._session_lines()
            self._commands()

    # -- reading commands ------------------------------------------------------------------

    def _commands(self) -> None:
        """Answer every whole command line in the buffer, in one write."""
        out: list[bytes] = []
        core = self.core
        assert core is not None
        buf, take = self.buf, self.lines.take_line
        while self.mode == _COMMAND and not self._writing_paused:
            line = take(buf)
            if line == INCOMPLETE:
                break
            step = core.overlong() if line is OVERLONG else self._decide(core, line)
            out.append(step.wire)
            nxt = step.next
            if nxt is Next.COMMAND:
                continue
            if nxt is Next.CONTENT:
                self._write(b"".join(out))
                out = []
                assert core.content is not None
                self.eod = EndOfData(core.content)
                self.mode = _CONTENT
                self.deadline = time.monotonic() + self.cfg.server.data_timeout
                if buf:
                    rest = bytes(buf)
                    buf.clear()
                    self._content(rest)
                return
            self._write(b"".join(out))
            out = []
            if nxt is Next.CLOSE:
                self.hang_up()
            elif nxt is Next.AUTH:
                self._busy(self._auth())
            elif nxt is Next.STARTTLS:
                self._start_tls()
            return
        if out:  # (a line was answered: the next one has its own deadline)
            self._write(b"".join(out))
            if self.mode == _COMMAND:
                self.deadline = time.monotonic() + self.cfg.server.command_timeout
        if self.eof and self.mode == _COMMAND:
            self.hang_up()

    def _decide(self, core: Transaction, line: bytes) -> Step:
        try:
            step = core.receive(line)
        except Exception as exc:  # nobody classified it: temporary
            log.error("internal error in SMTP session with [%s]: %r", self.peer_ip, exc, exc_info=exc)
            return Step((LOCAL_ERROR,))
        refused = step.refused
        if step.replies and step.replies[0].code >= 400 and line[:4].upper() == b"RCPT":
            maillog.refused_rcpt(line, self.peer_ip, core.helo_name, core.sender, step.replies[0], refused)
        elif refused is not None and (isinstance(refused, RouteError) or refused.reply.status.startswith("5.7")):
            log.info("refused %s client=[%s]: %s", maillog.printable(line[:300].rstrip(b"\r\n")),
                     self.peer_ip, maillog.printable(refused.detail))
        return step

    def _content(self, data: bytes) -> None:
        """Feed what was read to the content: one `SLICE` now, the rest a slice per round
        of the event loop with reading paused meanwhile, so a big message is checked a
        piece at a time while the other sessions get their turns (DESIGN invariant 9)."""
        if self.buf:  # slices still wait: this comes after them
            self.buf += data
            return
        if len(data) > SLICE:
            self.buf += memoryview(data)[SLICE:]
            data = data[:SLICE]
        self._feed(data)
        if self.buf and self.mode == _CONTENT:
            self._pause()
            asyncio.get_running_loop().call_soon(self._next_slice)

    def _next_slice(self) -> None:
        if self.mode != _CONTENT:  # ended meanwhile (closed, or a deadline)
            return
        data = bytes(self.buf[:SLICE])
        del self.buf[:SLICE]
        self._feed(data)
        if self.mode != _CONTENT:
            return
        if self.buf:
            asyncio.get_running_loop().call_soon(self._next_slice)
        else:
            self._resume()

    def _feed(self, data: bytes) -> None:
        eod = self.eod
        assert eod is not None
        try:
            rest = eod.feed(data)
        except Exception as exc:  # a bug of ours: the stream can no longer be trusted
            log.error("internal error reading DATA from [%s]: %r", self.peer_ip, exc, exc_info=exc)
            self._write(wire((LOCAL_ERROR,)))
            self.hang_up()
            return
        if rest is None:
            return
        self.eod = None
        self.buf[:0] = rest  # the next commands, before what was read behind them
        self._busy(self._finish())

    async def _finish(self) -> None:
        core = self.core
        assert core is not None
        reply = await finish_message(self, core)
        step = core.answer(reply)
        self._write(step.wire)
        if step.next is Next.CLOSE:
            self.hang_up()

    # -- the slow parts, in a task ------------------------------------------------------------

    def _busy(self, work: object) -> None:
        """Run ``work`` (a coroutine) while the buffer waits; then read on."""
        self.mode = _BUSY
        self.deadline = float("inf")
        self._session_lines()  # the task's lines, and the queue's tasks it starts
        self.task = asyncio.get_running_loop().create_task(self._then_resume(work))

    def _session_lines(self) -> None:
        """This connection's id on the log lines written now (maillog.SESSION)."""
        if maillog.SESSION.get() != self.session_id:
            maillog.SESSION.set(self.session_id)

    async def _then_resume(self, work: object) -> None:
        try:
            await work  # type: ignore[misc]
        except (ConnectionError, asyncio.CancelledError):
            self.hang_up()
            return
        except Exception as exc:  # a bug of ours: this connection ends, the others go on
            log.error("internal error in SMTP session with [%s]: %r", self.peer_ip, exc, exc_info=exc)
            self._write(wire((LOCAL_ERROR,)))
            self.hang_up()
            return
        finally:
            self.task = None
        if self.mode == _BUSY:
            self.mode = _COMMAND
            self.deadline = time.monotonic() + self.cfg.server.command_timeout
            self._resume()
            self._commands()

    async def read_line(self) -> bytes | None:
        """The next line, for a task (the AUTH exchange): None when it was over-long."""
        while True:
            line = self.lines.take_line(self.buf)
            if line != INCOMPLETE:
                return line
            if self.eof or self.mode == _CLOSED:
                raise ConnectionResetError("the client went away")
            self._resume()  # (paused while the task had what it needed, or while the replies waited)
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None and self.certs is not None
        transport.write(TLS_GO_AHEAD)
        transport.pause_reading()  # nothing more is ours until the handshake is done
        self.buf.clear()  # plain text pipelined behind STARTTLS is dropped (RFC 3207 §5)
        self._busy(self._starttls(transport))

    async def _starttls(self, raw: asyncio.Transport) -> None:
        await self._handshake(raw)
        if self.transport is not None and self.core is not None:
            self.core.tls_started(describe(self.transport.get_extra_info("ssl_object")))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        certs = self.certs
        assert certs is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(raw, self, certs.front, server_side=True,
                                                              ssl_handshake_timeout=self.mm.handshake_timeout)
        except Exception as exc:  # OSError, ssl.SSLError, the handshake timeout, or a bug
            log.info("TLS handshake failed client=[%s]: %s", self.peer_ip, maillog.printable(repr(exc)))
            raw.close()
            tls = None
        if tls is None:  # failed, or the connection went while it ended: asyncio's TLS layer
            self.mode = _CLOSED  # may never tell us, so the slot is given back here
            self.transport = None
            self.mm.release(self)
            return
        self.transport = tls  # (what the TLS layer decrypted with its handshake's end is in `buf` already)
        self.lines = LineReader()
        self.last_read = time.monotonic()
        self.mm.metrics.tls_started()  # metrics hook (issue 12)

    async def _implicit_tls(self, raw: asyncio.Transport) -> None:
        """The handshake of a 465 connection (RFC 8314), then the session over it."""
        await self._handshake(raw)
        if self.transport is None:
            return
        self.core = core = self._new_core()
        core.tls_started(describe(self.transport.get_extra_info("ssl_object")))
        self._write(self.mm.greeting(core))  # then `_then_resume` reads on

    # -- writing, deadlines, the end ---------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self.mm.metrics.sent(data)

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.transport is not None and not self._writing_paused:
            self.paused = False
            self.transport.resume_reading()

    def expire(self, now: float) -> None:
        """The server's sweeper: close the session if a deadline has passed."""
        if self.mode == _CLOSED:  # hung up, its replies still unread: no longer than a command's time
            if self.transport is not None and now > self.deadline:
                self.transport.abort()
            return
        if self.mode == _BUSY:
            return
        if now > self.deadline or now - self.last_read > self.cfg.server.timeout:
            token = maillog.SESSION.set(self.session_id)  # (the sweeper's task: this session's lines)
            try:
                self._expire(now)
            finally:
                maillog.SESSION.reset(token)

    def _expire(self, now: float) -> None:
        if now > self.deadline:
            if self.mode == _CONTENT:
                log.info("timeout reading DATA from [%s]", self.peer_ip)
                self._write(wire((DATA_TIMEOUT,)))
            else:
                log.info("timeout waiting for a command from [%s]", self.peer_ip)
                self._write(wire((COMMAND_TIMEOUT,)))
            self.hang_up()
        elif now - self.last_read > self.cfg.server.timeout:
            log.info("connection timeout client=[%s]", self.peer_ip)
            self.hang_up()

    def hang_up(self) -> None:
        if self.mode != _CLOSED:  # the close waits for the replies to be read, up to `expire`'s deadline
            self.deadline = time.monotonic() + self.cfg.server.command_timeout
        self.mode = _CLOSED
        if self.transport is not None:
            self.transport.close()
