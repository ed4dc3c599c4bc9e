"""The SMTP face: monomail's own SMTP connections, in monomail's own event loop.

Job: listen on every ``server.listen`` address (the MX port) and the submission
addresses (``submission.listen``: STARTTLS then AUTH, RFC 6409; ``listen_tls``:
implicit TLS, RFC 8314), count and limit the connections, keep their deadlines, and
hand each to a `session.Session`: an ``asyncio.Protocol`` that reads command lines and
message content and writes what the transaction core (``transaction``) decides;
``policy`` is its recipient and sender-ownership check, ``authexchange`` its AUTH, and
``finish`` the end of DATA (our Received header, the inbound checks for mail from
outside, ``queue.accept``, whose reply is the answer to DATA). The server ends at
``queue.accept()``.

Local submission (``localsubmit`` adds a ``LOCAL`` listener: a UNIX socket): the client is the peer's
uid (``SO_PEERCRED``, ``localpeer``); trusted (may relay); MAIL FROM its own address or
``<>`` unless the uid is trusted (``policy.local_sender``, else 553 5.7.1); completed like
submitted mail, with a Received field naming the user.

Limits (``limits``): connections beyond ``server.max_connections`` or, from one client
(IPv6: one /64; trusted networks exempt), beyond ``max_connections_per_ip`` get ``421
4.7.0`` (on the implicit-TLS port, where a plain-text reply cannot be read, they are
closed: they are counted before their handshake, which asyncio's ``loop.start_tls`` does
with a deadline); after ``auth.auth_failures`` failed AUTHs within 15 minutes every AUTH from that
client gets ``421 4.7.0``. Deadlines, kept by one sweeper for all sessions (`SMTPServer.sweep`,
a few times a second): a session with no byte from the client for ``server.timeout`` is
closed; each command line (and each AUTH response) must be complete within
``command_timeout``, the whole DATA phase within ``data_timeout``, else ``421 4.4.2`` and
the connection is closed.

Why not aiosmtpd's ``SMTP`` class (issue 13): it is a ``StreamReaderProtocol`` with a task,
a StreamReader and a timer per connection and a per-connection ``inspect.getmembers``;
measured under load that was a fifth of the event loop's time, and ~11 KB per idle
connection. The sessions here keep no task while they wait and decide pipelined commands
as they arrive. aiosmtpd stays the SMTP peer of the tests and benchmarks.

What this package does not do: decide anything about a command (``transaction``), check
message content (``message.Content``), route (``policy``/``router``), deliver (``queue``).

Error handling: an exception nobody classified answers ``451 4.3.0`` with generic text
and is logged with its traceback; one raised while message content is being read also
closes the connection, since the client's stream cannot be trusted to be at a command then.

Security stance: no relay for untrusted clients (``policy``); client words reach headers
only through ``message.safe_word`` and the log only through ``maillog.printable``;
replies never carry causes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

from .. import inbound, policy
from ..auth import Authenticator
from ..errors import TOO_MANY_CONNECTIONS, Reply
from ..limits import Connections, FailureWindow, client_key
from ..metrics import Metrics
from ..queue import Queue
from ..resolver import Resolver
from ..router import Tables
from ..settings import Config, Listen
from ..tls import Certificates
from ..transaction import Transaction, wire
from .session import IDENT, LOCAL, MX, SUBMISSION, SUBMISSIONS, Session

__all__ = ["IDENT", "LOCAL", "MX", "SUBMISSION", "SUBMISSIONS", "SMTPServer", "Session", "listeners"]

log = logging.getLogger("monomail.smtp")

CLIENT_CACHE = 4096  # client addresses whose trust and limits key are remembered
TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address, try again later")


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
        self._sweeper: asyncio.Task[None] | None = None
        self._clients: tuple[Config, dict[str, tuple[bool, str]]] = (config, {})
        self._greeting: tuple[Config | None, bytes] = (None, b"")
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
        self._sweeper = self.loop.create_task(self._sweep_forever())

    def sweep(self, now: float) -> None:
        """Close the sessions past a deadline (`session.Session.expire`)."""
        for session in list(self.sessions):
            session.expire(now)

    def _tick(self) -> float:
        srv = self.config.server  # (follows a reload)
        return min(1.0, max(0.05, min(srv.timeout, srv.command_timeout, srv.data_timeout) / 8))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick())
            try:
                self.sweep(time.monotonic())
            except Exception as exc:  # a bug of ours: the deadlines must go on
                log.error("internal error in the session sweeper: %r", exc, exc_info=exc)

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
        if session.kind == LOCAL:
            session.trusted, session.client = True, session.peer_ip
        else:
            session.trusted, session.client = self._client(session.peer_ip)
        if not session.trusted and not self.per_client.open(session.client):
            log.info("refused connection from [%s]: %d connections from it already", session.peer_ip,
                     self.per_client.count(session.client))
            return TOO_MANY_FROM_CLIENT
        self.sessions.add(session)
        return None

    def _client(self, peer_ip: str) -> tuple[bool, str]:
        """Is this address trusted (`policy.is_trusted`), and its limits key
        (`limits.client_key`): remembered per address for the config in force (a reload
        starts afresh); at most `CLIENT_CACHE` addresses are kept."""
        cache = self._clients
        if cache[0] is not self.config or len(cache[1]) >= CLIENT_CACHE:
            cache = self._clients = (self.config, {})
        known = cache[1].get(peer_ip)
        if known is None:
            known = cache[1][peer_ip] = (policy.is_trusted(peer_ip, self.config), client_key(peer_ip))
        return known

    def greeting(self, core: Transaction) -> bytes:
        """The 220 line of a new session, made once per config."""
        if self._greeting[0] is not self.config:
            self._greeting = (self.config, wire((core.greeting(IDENT),)))
        return self._greeting[1]

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
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.hang_up()
            session.expire(float("inf"))  # (cut one whose replies wait unread: wait_closed would wait for it)
        for s in self.servers:
            await s.wait_closed()

