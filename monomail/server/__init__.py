"""The SMTP face: aiosmtpd's connections, monomail's SMTP core, in monomail's own event loop.

Job: listen on every ``server.listen`` address (the MX port) and the submission
addresses (``submission.listen``: STARTTLS then AUTH, RFC 6409; ``listen_tls``:
implicit TLS, RFC 8314), read command lines and message content from each client, and
write back what the transaction core (``transaction``) decides; ``policy`` is its
recipient and sender-ownership check. A complete message gets our Received header (and,
submitted, the Date and Message-ID it lacks) and goes to ``queue.accept``, whose reply
is the answer to DATA. The server ends at ``queue.accept()``. Mail on the MX port from
a client outside the trusted networks that has not authenticated is checked first
(``inbound``: SPF, DKIM, DMARC, in a worker thread): it gets the Authentication-Results
field, and a DMARC failure under ``p=reject`` with ``checks.dmarc = "enforce"`` is
answered ``550 5.7.1`` (logged with the results) instead of being queued. Submitted mail
is not checked, but loses any Authentication-Results claiming our hostname.

Local submission (``localsubmit`` adds a ``LOCAL`` listener: a UNIX socket): the client is the peer's
uid (``SO_PEERCRED``, ``localpeer``); trusted (may relay); MAIL FROM its own address or
``<>`` unless the uid is trusted (``policy.local_sender``, else 553 5.7.1); completed like
submitted mail, with a Received field naming the user.

TLS (``tls``): STARTTLS is offered on every listener when ``[tls]`` is set; the
handshake is aiosmtpd's (``smtp_STARTTLS``), which also discards plain text pipelined
behind STARTTLS (RFC 3207 §5, the command injection family), and whose 220 reply is
its own. The certificate is ``tls.Certificates``' front context, renewed without a
restart. AUTH LOGIN is exchanged by aiosmtpd's ``auth_LOGIN``, PLAIN by our
`Session.auth_PLAIN` (aiosmtpd's drops the authzid: ours refuses one that is not the
user itself, RFC 4616 §2), both through our `Session.challenge_auth` (334, base64,
``*`` to cancel; an over-long response is skipped to its end and gets 500 5.5.6,
aiosmtpd's would leave its rest to be read as a command); the credentials are
checked by ``auth`` (the password file or Dovecot) off the event loop.

Limits (``limits``): connections beyond ``server.max_connections`` or, from one client
(IPv6: one /64; trusted networks exempt), beyond ``max_connections_per_ip`` get ``421
4.7.0`` (on the implicit-TLS port, where a plain-text reply cannot be read, they are
closed: they are counted before their handshake, which asyncio's ``loop.start_tls`` does
with a deadline); after ``auth.auth_failures`` failed AUTHs within 15 minutes every AUTH from that
client gets ``421 4.7.0``, and each failure is logged as ``auth failed client=[ip]
user=name session=ID mechanism=M`` (``contrib/fail2ban`` matches it). Deadlines: a session
with no byte from the client for ``server.timeout`` is closed; each command line (and
each AUTH response) must be complete within ``command_timeout``, the whole DATA phase
within ``data_timeout``, else ``421 4.4.2`` and the connection is closed.

What this module does not do: decide anything about a command (``transaction``), check
message content (``message.Content``), route (``policy``/``router``), deliver (``queue``).

Reading (DESIGN invariant 9): command lines and content pieces as ``smtpread`` reads
them, checked as they come by ``message.Content``; the whole message is joined (one
copy) in a worker thread.

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

- ``SMTP.__init__`` (hostname, timeout, loop, tls_context, authenticator), ``push`` (one
  write + drain per step), ``smtp_STARTTLS``, ``auth_LOGIN`` (which calls the
  ``challenge_auth`` we override) with the ``authenticator`` callback and ``AuthResult``/``LoginPassword``/``MISSING``,
  ``connection_made``/``connection_lost``/``data_received`` (asyncio protocol methods we
  extend; after STARTTLS aiosmtpd's TLS layer calls ``connection_made`` again), and the
  documented ``line_length_limit`` (1001), which is the StreamReader's limit: longer
  command lines are skipped and refused.

aiosmtpd internals monomail depends on (no public way exists; tested with aiosmtpd
1.4.6, and ``pyproject.toml`` pins ``>=1.4.6,<1.5``):

1. ``SMTP._handle_client`` is replaced by `Session._handle_client`: aiosmtpd starts it
   as the connection's task in ``connection_made`` and cancels it in
   ``connection_lost``/``eof_received``. Its own command parsing and ``smtp_*``
   methods are not used at all.
2. ``SMTP._reader``: the connection's ``asyncio.StreamReader``, set by
   ``SMTP._cb_client_connected``.
3. ``SMTP._reset_timeout()``: restarts aiosmtpd's idle timer (``server.timeout``);
   called on every piece of data the client sends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from aiosmtpd.smtp import LoginPassword, TLSSetupException

from .. import inbound, maillog, policy, smtpread
from ..auth import Authenticator
from ..envelope import Address, Envelope, new_id
from ..errors import LOCAL_ERROR, TOO_MANY_CONNECTIONS, Reply, RouteError
from ..limits import Connections, FailureWindow, client_key
from ..localpeer import LocalPeer, peer_of, received_local
from ..message import Content, completion_fields, received_header
from ..metrics import Metrics
from ..queue import Queue
from ..resolver import Resolver
from ..router import Tables
from ..settings import Config, Listen
from ..tls import Certificates, describe
from ..transaction import Message, Next, Step, Transaction, wire
from .authexchange import COMMAND_TIMEOUT, AuthExchange

log = logging.getLogger("monomail.smtp")
IDENT = "ESMTP monomail"
JOIN_IN_THREAD = 256 * 1024  # content larger than this is joined in a worker thread
MX, SUBMISSION, SUBMISSIONS, LOCAL = "mx", "submission", "submissions", "local"  # the kinds of listener

TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address, try again later")
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout reading message data, closing connection")

_AIOSMTPD_LOG = logging.getLogger("mail.log")
_AIOSMTPD_LOG.setLevel(logging.WARNING)  # aiosmtpd logs every connection at INFO
if not any(isinstance(f, maillog.PrintableFilter) for f in _AIOSMTPD_LOG.filters):
    _AIOSMTPD_LOG.addFilter(maillog.PrintableFilter())


class _NoHooks:
    """aiosmtpd's handler object: monomail uses none of its hooks (the core decides)."""


class Session(AuthExchange):
    """One SMTP connection: aiosmtpd's protocol object, our command loop (the AUTH
    exchange: `AuthExchange`)."""

    def __init__(self, server: SMTPServer, kind: str = MX) -> None:
        self.mm = server
        self.kind = kind
        self.cfg, self.tables, self.auth, self.resolver = server.config, server.tables, server.auth, server.resolver
        self.certs = certs = server.certificates  # the settings taken once: a reload is for new sessions
        self.peer_ip = "127.0.0.1"
        self.session_id = maillog.new_session_id()  # on this connection's lines (maillog.SESSION)
        self.failures = server.failures  # AUTH failures per client (limits.FailureWindow)
        self.client = ""  # the limits' key for this client (limits.client_key)
        self.trusted = False
        self.local: LocalPeer | None = None  # the user on a local socket (SO_PEERCRED)
        self._starting_tls = False
        self._connected = False  # aiosmtpd's connection_made has run (its connection_lost must)
        self._raw: asyncio.BaseTransport | None = None  # the TCP transport, while an implicit TLS handshake runs
        self._handshake: asyncio.Task[None] | None = None
        self._credentials: LoginPassword | None = None
        self._authzid = b""  # PLAIN's authorization identity (RFC 4616), "" for none
        super().__init__(  # size, SMTPUTF8, the greeting are the core's: aiosmtpd's own commands are unused
            _NoHooks(),
            hostname=self.cfg.hostname,  # else aiosmtpd asks socket.getfqdn() on every connection
            timeout=self.cfg.server.timeout,
            loop=server.loop,
            tls_context=certs.front if certs else None,
            authenticator=self._capture,
        )
        self.core = Transaction(self.cfg, self._check_recipient, tls=certs is not None and kind != LOCAL,
                                submission=kind in (SUBMISSION, SUBMISSIONS), owner=self._owns,
                                local_sender=self._local_sender if kind == LOCAL else None)

    def _check_recipient(self, address: Address, sender: str) -> object:
        return policy.check_recipient(address, self.cfg, trusted=self.trusted or self.core.login is not None,
                                      sender=sender, tables=self.tables)

    def _owns(self, login: str, address: str) -> bool:
        return policy.owns(login, address, self.cfg, self.tables)

    def _local_sender(self, sender: str) -> bool:
        peer = self.local
        return peer is not None and policy.local_sender(sender, peer.name, peer.trusted, self.cfg)

    # -- connection bookkeeping ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._starting_tls:  # aiosmtpd's TLS layer after the STARTTLS handshake
            super().connection_made(transport)
            return
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
            if self.kind != SUBMISSIONS and isinstance(transport, asyncio.WriteTransport):
                transport.write(wire((refusal,)))  # (on 465 plain text would only garble the handshake)
            transport.close()
            return
        if self.kind == SUBMISSIONS:  # implicit TLS: counted above, before the handshake
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # the ClientHello is for the TLS layer, not for our reader
            self._raw = transport
            self._handshake = self.loop.create_task(self._implicit_tls(transport))
            return
        self._connected = True
        super().connection_made(transport)

    async def _implicit_tls(self, raw: asyncio.Transport) -> None:
        """The handshake of a 465 connection (RFC 8314), then the session over it."""
        certs = self.certs
        assert certs is not None
        maillog.SESSION.set(self.session_id)  # this task's, and the session's it starts
        try:
            tls = await self.loop.start_tls(raw, self, certs.front, server_side=True,
                                            ssl_handshake_timeout=self.mm.handshake_timeout)
        except Exception as exc:  # OSError, ssl.SSLError, the handshake timeout, or a bug
            log.info("TLS handshake failed client=[%s]: %s", self.peer_ip, maillog.printable(repr(exc)))
            raw.close()
            self.mm.release(self)
            return
        finally:
            self._raw = None
        if tls is None:  # the connection went while the handshake ended
            self.mm.release(self)
            return
        self.core.tls_started(describe(tls.get_extra_info("ssl_object")))
        self.mm.metrics.tls_started()  # metrics hook (issue 12)
        self._connected = True
        super().connection_made(tls)

    def connection_lost(self, error: Exception | None) -> None:
        self.mm.release(self)  # once per session: it does nothing the second time
        if self._connected:  # else refused above, or its TLS handshake never finished
            self._connected = False
            super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._reset_timeout()  # internal 3: the idle timer counts from the client's last byte
        super().data_received(data)

    # -- the command loop (replaces aiosmtpd's, internal 1) -----------------------

    async def push(self, status: Any) -> None:  # metrics hook (issue 12): every reply we write
        await super().push(status)
        self.mm.metrics.sent(status)

    async def _handle_client(self) -> None:
        maillog.SESSION.set(self.session_id)  # this task's lines, and the queue's tasks it starts
        try:
            await self._send((self.core.greeting(IDENT),))
            while self.transport is not None:
                step = await self._next_command()
                if step.next is Next.AUTH:
                    step = await self._auth_exchange()
                await self._send_step(step)
                if step.next is Next.CONTENT:
                    if not await self._read_content():
                        return
                    step = self.core.answer(await self._finish_message())
                    await self._send_step(step)
                if step.next is Next.STARTTLS and not await self._start_tls():
                    return
                if step.next is Next.CLOSE:
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

    async def _read_line(self) -> bytes | None:
        return await smtpread.read_line(self._reader)  # internal 2

    async def _next_command(self) -> Step:
        try:
            async with asyncio.timeout(self.cfg.server.command_timeout):
                line = await self._read_line()
        except TimeoutError:
            log.info("timeout waiting for a command from [%s]", self.peer_ip)
            return Step((COMMAND_TIMEOUT,), Next.CLOSE)
        if line is None:
            return self.core.overlong()
        try:
            step = self.core.receive(line)
        except Exception as exc:  # nobody classified it: temporary
            log.error("internal error in SMTP session with [%s]: %r", self.peer_ip, exc, exc_info=exc)
            return Step((LOCAL_ERROR,))
        if line[:4].upper() == b"RCPT" and step.replies and step.replies[0].code >= 400:
            core = self.core
            maillog.refused_rcpt(line, self.peer_ip, core.helo_name, core.sender, step.replies[0], step.refused)
        elif isinstance(step.refused, RouteError) or (step.refused and step.refused.reply.status.startswith("5.7")):
            log.info("refused %s client=[%s]: %s", maillog.printable(line[:300].rstrip(b"\r\n")),
                     self.peer_ip, maillog.printable(step.refused.detail))
        return step

    # -- STARTTLS and AUTH ------------------------------------------------------------

    async def _start_tls(self) -> bool:
        """aiosmtpd's STARTTLS (it writes the 220); False if the handshake failed."""
        self._starting_tls = True
        try:
            async with asyncio.timeout(self.cfg.server.command_timeout):
                await self.smtp_STARTTLS("")
        except (TLSSetupException, TimeoutError, ConnectionError, OSError) as exc:
            cause = exc.__cause__ or exc
            log.info("TLS handshake failed client=[%s]: %s", self.peer_ip, maillog.printable(repr(cause)))
            self.hang_up()
            self.connection_lost(None)  # asyncio's TLS layer never tells us: give the slot back here
            return False
        self.core.tls_started(describe(self.transport.get_extra_info("ssl_object") if self.transport else None))
        self.mm.metrics.tls_started()  # metrics hook (issue 12)
        return True

    async def _read_content(self) -> bool:
        """Read the content to the end-of-data line, feeding the core's `Content`; False
        (connection closed) if something went wrong that nobody classified."""
        content = self.core.content
        assert content is not None
        try:
            async with asyncio.timeout(self.cfg.server.data_timeout):
                await self._read_pieces(content)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            raise
        except TimeoutError:
            log.info("timeout reading DATA from [%s]", self.peer_ip)
            await self._send((DATA_TIMEOUT,))
            self.hang_up()
            return False
        except Exception as exc:
            log.error("internal error reading DATA from [%s]: %r", self.peer_ip, exc, exc_info=exc)
            await self._send((LOCAL_ERROR,))
            self.hang_up()
            return False
        return True

    async def _read_pieces(self, content: Content) -> None:
        await smtpread.read_pieces(self._reader, content)  # internal 2

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
        cfg = self.cfg
        now = time.time()
        qid = new_id(now)
        rcpts = msg.recipients
        one = rcpts[0] if len(rcpts) == 1 else None
        if self.local is not None:
            header = received_local(self.local, helo=msg.helo, hostname=cfg.hostname, protocol=msg.protocol,
                                    queue_id=qid, recipient=one, when=now)
        else:
            header = received_header(helo=msg.helo, peer_ip=self.peer_ip, hostname=cfg.hostname,
                                     protocol=msg.protocol, queue_id=qid, recipient=one, when=now, tls=msg.tls)
        submitted = msg.login is not None or self.local is not None
        if submitted:  # by a mail client or a local user: complete what it left out
            header += completion_fields(msg.content.header, sender=msg.sender, hostname=cfg.hostname,
                                        queue_id=qid, when=now)
        if msg.content.size > JOIN_IN_THREAD:
            data = await asyncio.to_thread(msg.content.join, header)
        else:
            data = msg.content.join(header)
        if self.kind == MX and not self.trusted and msg.login is None:  # from outside: checked
            verdict = await inbound.check(data, client_ip=self.peer_ip, helo=msg.helo, sender=msg.sender,
                                          config=cfg, resolver=self.resolver)
            if verdict.reply is not None:
                log.info("%s: refused DATA from [%s] from=<%s>: %s", qid, self.peer_ip,
                         maillog.printable(msg.sender), maillog.printable(verdict.summary))
                return verdict.reply
            log.log(logging.INFO if verdict.action == inbound.QUARANTINE or verdict.removed else logging.DEBUG,
                    "%s: checked client=[%s] action=%s: %s", qid, self.peer_ip, verdict.action,
                    maillog.printable(verdict.summary))
            data = verdict.message
        elif submitted:  # not checked, but results claiming our name go
            data, removed = inbound.without_our_results(data, cfg.hostname)
            if removed:
                log.info("%s: submitted by %s: removed %d Authentication-Results claiming our name",
                         qid, maillog.printable(msg.login or self.peer_ip), removed)
        env = Envelope(qid, msg.sender, rcpts, now, msg.smtputf8, len(data))
        user = msg.login or (self.local.name if self.local else None)
        maillog.received(env, client=self.peer_ip, helo=msg.helo, tls=msg.tls, user=user, data=data)
        return await self.mm.queue.accept(env, data)

    async def _send(self, replies: tuple[Reply, ...]) -> None:
        if replies:
            await self.push(wire(replies)[:-2])  # push adds the last CRLF

    async def _send_step(self, step: Step) -> None:
        data = step.wire
        if data:
            await self.push(data[:-2])

    def hang_up(self) -> None:
        transport = self.transport or self._raw
        if transport is not None:
            transport.close()


def listeners(config: Config) -> list[tuple[str, Listen]]:
    """Every TCP listener the config asks for, with its kind."""
    sub = config.submission
    return ([(MX, a) for a in config.server.listen] + [(SUBMISSION, a) for a in sub.listen]
            + [(SUBMISSIONS, a) for a in sub.listen_tls])


class SMTPServer:
    """Listens on the MX and submission addresses; owns the sessions and their limits.

    ``certificates`` (None: no TLS) must be given when submission ports are configured;
    ``auth`` checks AUTH credentials (submission only)."""

    def __init__(self, config: Config, queue: Queue, tables: Tables | None = None, *,
                 certificates: Certificates | None = None, auth: Authenticator | None = None,
                 resolver: Resolver | None = None) -> None:
        self.config = config
        self.resolver = resolver or Resolver(config.dns.nameservers, config.dns.timeout)  # inbound checks
        self.queue = queue
        self.tables = tables
        self.certificates = certificates
        self.auth = auth if auth is not None else Authenticator(config.auth)
        self.sessions: set[Session] = set()
        self.per_client = Connections(config.server.max_connections_per_ip)
        self.failures = FailureWindow(config.auth.auth_failures, time.monotonic)
        self.servers: list[asyncio.Server] = []
        self.kinds: list[str] = []  # each server's kind of listener, in `servers` order
        self.listening: dict[tuple[str, Listen], asyncio.Server] = {}  # the TCP ones, by what the config says
        self.loop: asyncio.AbstractEventLoop | None = None
        self._serving = True
        self.metrics = Metrics()  # counters (issue 12); app serves them when [metrics] is on

    @property
    def handshake_timeout(self) -> float:  # an implicit TLS handshake (follows a reload)
        return min(self.config.server.command_timeout, 60.0)

    async def start(self, serving: bool = True) -> None:
        """Bind every listener; with ``serving`` False, accept nothing until `serve`
        (root binds, then gives up root before the first client: ``privileges``)."""
        self.loop = asyncio.get_running_loop()
        self._serving = serving
        await asyncio.to_thread(inbound.prepare)
        if any(kind != MX for kind, _ in listeners(self.config)) and self.certificates is None:
            raise RuntimeError("submission ports need the TLS certificates")
        for kind, addr in listeners(self.config):
            await self.listen(kind, addr)

    async def listen(self, kind: str, addr: Listen) -> None:  # OSError when it cannot be bound
        assert self.loop is not None
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_UNSPEC
        server = await self.loop.create_server(  # 465's TLS: `Session._implicit_tls`, once counted
            lambda: Session(self, kind), host=addr.host, port=addr.port, family=family,
            reuse_address=True, backlog=512, start_serving=self._serving,
        )
        self.servers.append(server)
        self.kinds.append(kind)
        self.listening[kind, addr] = server
        log.info("listening on %s (%s)", addr, kind)

    def unlisten(self, kind: str, addr: Listen) -> None:  # stop accepting there; its sessions go on
        server = self.listening.pop((kind, addr))
        del self.kinds[i := self.servers.index(server)], self.servers[i]
        server.close()
        log.info("no longer listening on %s (%s)", addr, kind)

    async def serve(self) -> None:
        """Start accepting on listeners bound with ``start(serving=False)``."""
        self._serving = True
        for server in self.servers:
            await server.start_serving()

    def admit(self, session: Session) -> Reply | None:
        """A new connection: count it, or the 421 that refuses it (nothing counted then)."""
        if len(self.sessions) >= self.config.server.max_connections:
            return TOO_MANY_CONNECTIONS
        session.trusted = session.kind == LOCAL or policy.is_trusted(session.peer_ip, self.config)
        session.client = session.peer_ip if session.kind == LOCAL else client_key(session.peer_ip)
        if not session.trusted and not self.per_client.open(session.client):
            log.info("refused connection from [%s]: %d connections from it already", session.peer_ip,
                     self.per_client.count(session.client))
            return TOO_MANY_FROM_CLIENT
        self.sessions.add(session)
        return None

    def release(self, session: Session) -> bool:
        """A connection ended; False if it was never admitted."""
        if session not in self.sessions:
            return False
        self.sessions.discard(session)
        if not session.trusted:
            self.per_client.close(session.client)
        return True

    @property
    def ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s, k in zip(self.servers, self.kinds, strict=True)
                if s.sockets and k != LOCAL]

    def port(self, kind: str) -> int:
        """The first port of one kind of listener (``mx``, ``submission``, ``submissions``)."""
        return next(s.sockets[0].getsockname()[1] for s, k in zip(self.servers, self.kinds, strict=True)
                    if k == kind and s.sockets)

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

