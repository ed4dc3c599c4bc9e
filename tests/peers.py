"""Test-side fakes of the outside world, as REAL servers on loopback (127.0.0.x only).

* :class:`DNSServer` — a tiny authoritative DNS server (UDP + TCP) built on ``dns.message``.
* :class:`SMTPPeer` — a scripted remote SMTP server (aiosmtpd ``SMTP`` protocol, or a raw
  asyncio server for the ``hang`` / ``greeting_reply`` modes).
* :func:`self_signed_cert` — a throwaway certificate for STARTTLS peers.

Each server runs in its own background thread (the DNS server with plain sockets, the SMTP
peer with its own asyncio event loop), so they work the same whether monomail runs in the
test's event loop, in a :class:`conftest.ThreadServer`, or as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

__all__ = ["DNSServer", "Received", "SMTPPeer", "self_signed_cert"]


def _check_loopback(host: str) -> None:
    if not (host.startswith("127.") or host == "::1"):
        raise ValueError(f"test peers bind loopback (127.0.0.x or ::1) only, not {host!r}")


# --------------------------------------------------------------------------------------------
# DNS
# --------------------------------------------------------------------------------------------

_NXDOMAIN = "NXDOMAIN"
_SERVFAIL = "SERVFAIL"
_DROP = "DROP"


def _key(name: str) -> str:
    """Canonical zone key: lower case, no trailing dot (the root is ``""``)."""
    return name.strip().rstrip(".").lower()


class DNSServer:
    """A tiny authoritative DNS server on ``host:<free port>`` (UDP, and TCP on the same port).

    Queries are parsed with ``dns.message.from_wire`` and answered with
    ``dns.message.make_response`` (AA flag set). Zone data lives in :attr:`zone`, a plain
    mutable dict, so a test may change answers between queries::

        zone[name] = {"MX": (ttl, ["10 mx1.example.test."]), "A": (ttl, ["127.0.0.2"])}
        zone[name] = "NXDOMAIN" | "SERVFAIL" | "DROP"

    (keys are lower case without trailing dot; the helper methods below fill it for you).

    Semantics:

    * names are case-insensitive, with or without trailing dot;
    * a configured name without records of the asked type → NOERROR, empty answer (NODATA);
      this also holds for any query type other than the configured ones (e.g. TXT);
    * a name never configured → NXDOMAIN (except an "empty non-terminal", i.e. a parent of a
      configured name such as ``example.test`` when only ``mx.example.test`` is configured,
      which answers NODATA as RFC 8020 says);
    * ``nxdomain()`` / ``servfail()`` / ``drop()`` override everything for that exact name;
    * no CNAME chasing, no additional-section glue, no SOA in negative answers;
    * every received query (including dropped ones) is logged in :attr:`queries` as
      ``(qname lower-cased without trailing dot, rdtype text)``.

    Calling ``mx()`` / ``a()`` / ``aaaa()`` again for the same name REPLACES that type's
    records (it doesn't append).

    Pointing dnspython 2.x at it: nameservers are IP addresses only; the port is a separate
    attribute — ``resolver.port`` (the default for every nameserver given as a string; it is
    read at each resolution, so it may be set before or after ``nameservers``), or per-server
    ``resolver.nameserver_ports = {"127.0.0.1": port}``, or pass
    ``dns.nameserver.Do53Nameserver("127.0.0.1", port)`` objects as nameservers. Answers are
    small, so dnspython stays on UDP (it only retries over TCP on a truncated (TC) reply)::

        dns_server = DNSServer().start()
        dns_server.mx("example.test", (10, "mx.example.test"))
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]; resolver.port = dns_server.port
        answer = await resolver.resolve("example.test", "MX")

    ``retry_servfail`` is False by default in dnspython, so a SERVFAIL answer makes the
    resolver drop that nameserver → ``dns.resolver.NoNameservers``; a dropped query ends in
    ``dns.resolver.LifetimeTimeout`` after ``resolver.lifetime`` seconds.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        _check_loopback(host)
        self.host = host
        self.port: int = 0
        self.zone: dict[str, dict[str, tuple[int, list[str]]] | str] = {}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._tcp_clients: set[socket.socket] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> DNSServer:
        """Bind a free port (the same number for UDP and TCP) and start serving."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            break
        else:  # pragma: no cover
            raise RuntimeError("could not bind a UDP+TCP port pair")
        self._udp, self._tcp, self.port = udp, tcp, port
        self._stop.clear()
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, name=f"dns-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        with self._lock:
            clients = list(self._tcp_clients)
        for c in clients:
            with contextlib.suppress(OSError):
                c.close()
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"`` — the form monomail's ``dns.nameservers`` takes."""
        return f"{self.host}:{self.port}"

    # -- zone editing ------------------------------------------------------------------------

    def records(self, name: str, rdtype: str, *texts: str, ttl: int = 300) -> None:
        """Set the records of one type (rdata in zone-file text form) for ``name``, replacing
        any previous records of that type; clears an nxdomain/servfail/drop override."""
        key = _key(name)
        rdtype = rdtype.upper()
        for text in texts:  # validate now rather than fail inside the server thread
            dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)
        with self._lock:
            entry = self.zone.get(key)
            if not isinstance(entry, dict):
                entry = {}
                self.zone[key] = entry
            entry[rdtype] = (ttl, list(texts))

    def mx(self, domain: str, *hosts: tuple[int, str], ttl: int = 300) -> None:
        """MX records: ``dns.mx("example.test", (10, "mx1.example.test"), (20, "mx2.example.test"))``."""
        self.records(domain, "MX", *(f"{int(pref)} {_absolute(host)}" for pref, host in hosts), ttl=ttl)

    def txt(self, name: str, *values: str, ttl: int = 300) -> None:
        """TXT records, one per value; a value over 255 octets is split into strings
        (as DKIM keys are): ``dns.txt("example.test", "v=spf1 mx -all")``."""
        def quoted(value: str) -> str:
            raw = value.encode()
            parts = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
            return " ".join('"' + p.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
        self.records(name, "TXT", *(quoted(v) for v in values), ttl=ttl)

    def ptr(self, address: str, host: str, ttl: int = 300) -> None:
        """A PTR record for ``address`` (in-addr.arpa / ip6.arpa)."""
        import ipaddress as _ip
        self.records(_ip.ip_address(address).reverse_pointer, "PTR", _absolute(host), ttl=ttl)

    def null_mx(self, domain: str) -> None:
        """RFC 7505 null MX: a single ``0 .`` record."""
        self.records(domain, "MX", "0 .")

    def a(self, name: str, *addresses: str, ttl: int = 300) -> None:
        self.records(name, "A", *addresses, ttl=ttl)

    def aaaa(self, name: str, *addresses: str, ttl: int = 300) -> None:
        self.records(name, "AAAA", *addresses, ttl=ttl)

    def nxdomain(self, name: str) -> None:
        """Answer NXDOMAIN for this name, all types."""
        with self._lock:
            self.zone[_key(name)] = _NXDOMAIN

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for this name, all types."""
        with self._lock:
            self.zone[_key(name)] = _SERVFAIL

    def drop(self, name: str) -> None:
        """Never answer queries for this name (the client times out)."""
        with self._lock:
            self.zone[_key(name)] = _DROP

    def clear(self, name: str) -> None:
        """Forget everything about this name (it then answers NXDOMAIN)."""
        with self._lock:
            self.zone.pop(_key(name), None)

    # -- serving -----------------------------------------------------------------------------

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname = question.name.to_text(omit_final_dot=True)
        key = _key(qname) if qname != "@" else ""
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((key, rdtype))
            entry = self.zone.get(key)
            if isinstance(entry, dict):
                entry = {t: (ttl, list(texts)) for t, (ttl, texts) in entry.items()}
            exists = entry is not None or any(k.endswith("." + key) or key == "" for k in self.zone)
        if entry == _DROP:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if entry == _SERVFAIL:
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.SERVFAIL)
        elif entry == _NXDOMAIN or not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif isinstance(entry, dict) and rdtype in entry:
            ttl, texts = entry[rdtype]
            if texts:
                rrset = dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN, rdtype, texts)
                response.answer.append(rrset)
        # else: NODATA (NOERROR, empty answer)
        return response.to_wire()

    def _serve_udp(self) -> None:
        sock = self._udp
        assert sock is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if not ready:
                continue
            try:
                wire, addr = sock.recvfrom(65535)
            except OSError:
                continue
            reply = self._answer(wire)
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply, addr)

    def _serve_tcp(self) -> None:
        sock = self._tcp
        assert sock is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if not ready:
                continue
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with self._lock:
                self._tcp_clients.add(conn)
            threading.Thread(target=self._serve_tcp_client, args=(conn,), daemon=True).start()

    def _serve_tcp_client(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            while not self._stop.is_set():
                header = _recv_exact(conn, 2)
                if header is None:
                    return
                wire = _recv_exact(conn, struct.unpack("!H", header)[0])
                if wire is None:
                    return
                reply = self._answer(wire)
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            pass
        finally:
            with self._lock:
                self._tcp_clients.discard(conn)
            conn.close()


def _absolute(host: str) -> str:
    return host if host.endswith(".") else host + "."


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# --------------------------------------------------------------------------------------------
# SMTP
# --------------------------------------------------------------------------------------------


@dataclass
class Received:
    """What a peer got (one accepted DATA)."""

    mail_from: str         # "" for the null reverse-path <>
    rcpt_tos: list[str]    # the recipients the peer accepted (2xx)
    data: bytes            # as received (CRLF line ends, dot-unstuffed)
    mail_options: list[str]  # MAIL FROM parameters, upper-cased by aiosmtpd, e.g. ["BODY=8BITMIME", "SIZE=123"]
    tls: bool              # the transaction ran over STARTTLS
    auth_user: str | None  # AUTH login used, if any
    peer: str              # client ip
    esmtp: bool = True     # the client greeted with EHLO (False: HELO)


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        self.thread.start()

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_all(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class _RawProtocol(asyncio.Protocol):
    """``hang`` (accept, never write) and ``greeting_reply`` (write one line, close)."""

    def __init__(self, peer: SMTPPeer, greeting: str | None) -> None:
        self.peer = peer
        self.greeting = greeting
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer._transports.add(transport)
        if self.greeting is not None:
            transport.write(self.greeting.encode() + b"\r\n")
            transport.close()

    def data_received(self, data: bytes) -> None:
        pass  # ignore whatever the client says

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.peer._transports.discard(self.transport)


class _Handler:
    """aiosmtpd handler hooks, scripted by the owning SMTPPeer."""

    def __init__(self, peer: SMTPPeer) -> None:
        self.peer = peer

    async def handle_EHLO(self, server: SMTP, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        p = self.peer
        if p.ehlo_reply is not None:
            return [p.ehlo_reply]  # session.host_name stays unset: MAIL then gets 503
        if p.reject_ehlo is not None:
            return [p.reject_ehlo]  # a peer from before ESMTP: only HELO works
        # With the 5-argument hook aiosmtpd does NOT record the HELO name itself.
        session.host_name = hostname
        lines = []
        for line in responses:
            keyword = line[4:].split(" ", 1)[0].upper()
            if keyword == "8BITMIME" and not p.eightbitmime:
                continue
            if keyword == "AUTH" and p.require_auth is None:
                continue
            lines.append(line[4:])
        return [("250-" if i < len(lines) - 1 else "250 ") + text for i, text in enumerate(lines)]

    async def handle_HELO(self, server: SMTP, session: Any, envelope: Any, hostname: str) -> str:
        if self.peer.ehlo_reply is not None:
            return self.peer.ehlo_reply
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: SMTP, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if not self.peer.eightbitmime and "BODY=8BITMIME" in mail_options:
            return "555 5.5.4 BODY=8BITMIME not supported"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        p = self.peer
        if p.drop_after_rcpt:
            # Hang up on the first RCPT, without replying to it. connection_lost() then
            # cancels this coroutine (aiosmtpd's client task ends cleanly on CancelledError).
            assert server.transport is not None
            server.transport.abort()
            await asyncio.sleep(3600)
        local = address.rpartition("@")[0] or address
        reply = "250 2.1.5 OK"
        for prefix, scripted in p.rcpt_replies.items():
            if local.lower().startswith(prefix.lower()):
                reply = scripted
                break
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        p = self.peer
        mail_from = envelope.mail_from or ""
        received = Received(
            mail_from="" if mail_from == "<>" else mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            mail_options=list(envelope.mail_options),
            tls=session.ssl is not None,
            auth_user=session.auth_data if session.authenticated else None,
            peer=session.peer[0] if session.peer else "",
            esmtp=bool(session.extended_smtp),
        )
        if p.data_reply is not None and not p.data_reply.startswith("2"):
            p.rejected.append(received)
            return p.data_reply
        p._record(received)
        return p.data_reply or "250 2.0.0 OK queued"


class SMTPPeer:
    """A scripted SMTP server on ``host:port`` (``port=0`` picks a free one; read ``.port``).

    Normal mode uses aiosmtpd's ``SMTP`` protocol directly (no ``Controller``, so no
    self-test connection skews :attr:`connections`) in an event loop on its own thread.

    * ``rcpt_replies``: local-part prefix (case-insensitive, first match in dict order) →
      reply, e.g. ``{"temp": "450 4.2.0 try later", "perm": "550 5.1.1 no such user"}``;
      anything else 250. Only 2xx recipients end up in ``Received.rcpt_tos``.
    * ``data_reply``: reply to the end of DATA (None = 250). A non-2xx reply puts the
      message in :attr:`rejected` instead of :attr:`received`.
    * ``greeting_reply``: sent instead of the 220 banner, then the connection is closed.
    * ``ehlo_reply``: reply to EHLO and HELO (the session then has no HELO name, so a
      following MAIL gets ``503 Error: send HELO first``).
    * ``reject_ehlo``: reply to EHLO only (e.g. ``502 5.5.1 Command not recognized``); HELO
      is then accepted as usual, a peer from before ESMTP. ``Received.esmtp`` tells which
      greeting the client used.
    * ``tls_cert``: (certfile, keyfile) → STARTTLS offered (not required).
    * ``require_auth``: (user, password) → AUTH PLAIN LOGIN offered (after STARTTLS only
      when ``tls_cert`` is given; on the plain connection otherwise), and MAIL without a
      successful AUTH gets ``530 5.7.0 Authentication required``. Without it AUTH is never
      advertised.
    * ``smtputf8`` / ``eightbitmime`` / ``size``: what EHLO advertises. With
      ``smtputf8=False`` aiosmtpd refuses ``MAIL ... SMTPUTF8`` (501); with
      ``eightbitmime=False`` the peer refuses ``BODY=8BITMIME`` (555). ``size=None`` → no
      SIZE keyword and no limit; ``size=n`` → ``SIZE n`` and 552 beyond it.
    * ``hang``: accept TCP connections, never send a greeting (raw asyncio server).
    * ``drop_after_rcpt``: on each connection, hang up when the first RCPT arrives, without
      replying to it.

    Messages are recorded in :attr:`received` (wait with :meth:`wait_for` from a thread, or
    :meth:`wait_for_async` from a coroutine running in the same loop as the sender).
    :attr:`connections` counts accepted TCP connections in every mode.
    """

    def __init__(self, host: str, port: int, *,
                 rcpt_replies: dict[str, str] | None = None,
                 data_reply: str | None = None,
                 greeting_reply: str | None = None,
                 ehlo_reply: str | None = None,
                 reject_ehlo: str | None = None,
                 tls_cert: tuple[str, str] | None = None,
                 require_auth: tuple[str, str] | None = None,
                 smtputf8: bool = True, eightbitmime: bool = True, size: int | None = None,
                 hang: bool = False,
                 drop_after_rcpt: bool = False,
                 hostname: str = "peer.test") -> None:
        _check_loopback(host)
        self.host = host
        self.port = port
        self.rcpt_replies = dict(rcpt_replies or {})
        self.data_reply = data_reply
        self.greeting_reply = greeting_reply
        self.ehlo_reply = ehlo_reply
        self.reject_ehlo = reject_ehlo
        self.tls_cert = tls_cert
        self.require_auth = require_auth
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.size = size
        self.hang = hang
        self.drop_after_rcpt = drop_after_rcpt
        self.hostname = hostname
        self.received: list[Received] = []
        self.rejected: list[Received] = []
        self.connections = 0
        self._cond = threading.Condition()
        self._transports: set[asyncio.BaseTransport] = set()
        self._protocols: list[SMTP] = []
        self._tls_context: ssl.SSLContext | None = None
        self._runner: _LoopThread | None = None
        self._server: asyncio.base_events.Server | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SMTPPeer:
        if self.tls_cert is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*self.tls_cert)
            self._tls_context = ctx
        self._runner = _LoopThread(f"smtp-peer-{self.host}:{self.port}")
        self._runner.start()
        try:
            self._server = self._runner.call(self._listen())
        except BaseException:
            self._runner.stop()
            self._runner = None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._runner.thread.name = f"smtp-peer-{self.host}:{self.port}"
        return self

    async def _listen(self) -> asyncio.base_events.Server:
        loop = asyncio.get_running_loop()
        factory: Any
        if self.hang or self.greeting_reply is not None:
            greeting = None if self.hang else self.greeting_reply

            def factory() -> asyncio.Protocol:
                self.connections += 1
                return _RawProtocol(self, greeting)
        else:
            factory = self._make_smtp
        return await loop.create_server(factory, self.host, self.port, reuse_address=True)

    def _make_smtp(self) -> SMTP:
        self.connections += 1
        authenticator = None
        if self.require_auth is not None:
            user, password = self.require_auth

            def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                              auth_data: Any) -> AuthResult:
                if isinstance(auth_data, LoginPassword) and \
                        (auth_data.login, auth_data.password) == (user.encode(), password.encode()):
                    return AuthResult(success=True, auth_data=user)
                return AuthResult(success=False, handled=False)

        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS can lead to security vulnerabilities!"
            warnings.simplefilter("ignore")
            protocol = SMTP(
                _Handler(self),
                hostname=self.hostname,
                data_size_limit=self.size,
                enable_SMTPUTF8=self.smtputf8,
                decode_data=False,
                tls_context=self._tls_context,
                require_starttls=False,
                authenticator=authenticator,
                auth_required=self.require_auth is not None,
                auth_require_tls=self.tls_cert is not None,
                timeout=30,
                loop=asyncio.get_running_loop(),
            )
        self._protocols.append(protocol)
        return protocol

    def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._transports):
                t.close()
            for p in self._protocols:
                for t in (p.transport, p._original_transport):
                    if t is not None:
                        with contextlib.suppress(Exception):
                            t.close()
            if self._server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2)
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            runner.call(shutdown(), timeout=5)
        runner.stop()
        self._server = None
        self._protocols.clear()

    def __enter__(self) -> SMTPPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- results -----------------------------------------------------------------------------

    def _record(self, received: Received) -> None:
        with self._cond:
            self.received.append(received)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10) -> list[Received]:
        """Block (this thread) until at least ``n`` messages were received; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.received) >= n, timeout):
                raise TimeoutError(f"{self.host}:{self.port} received {len(self.received)} of {n} messages")
            return list(self.received)

    async def wait_for_async(self, n: int, timeout: float = 10) -> list[Received]:
        """Like :meth:`wait_for` but polls with ``asyncio.sleep`` so the caller's loop keeps running."""
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host}:{self.port} received {len(self.received)} of {n} messages")
            await asyncio.sleep(0.02)
        return list(self.received)


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


def self_signed_cert(directory: Path) -> tuple[str, str] | None:
    """A self-signed certificate for CN=peer.test (valid 1 day) → ``(certfile, keyfile)``, made
    with the ``openssl`` command, else with ``cryptography`` if importable; None if neither works."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "peer-cert.pem", directory / "peer-key.pem"
    base = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
            "-out", str(cert), "-days", "1", "-subj", "/CN=peer.test"]
    for extra in (["-addext", "subjectAltName=DNS:peer.test,IP:127.0.0.1"], []):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(base + extra, capture_output=True, timeout=30)
            if done.returncode == 0 and _loads(cert, key):
                return str(cert), str(key)
    with contextlib.suppress(Exception):
        _cryptography_cert(cert, key)
        if _loads(cert, key):
            return str(cert), str(key)
    return None


def _loads(cert: Path, key: Path) -> bool:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError):
        return False
    return True


def _cryptography_cert(cert: Path, key: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("peer.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
