"""Remote delivery: find where a domain's mail goes (DNS) and hand it over (SMTP).

Job: for one message and one destination domain, try the domain's hosts in order and
return one `RemoteResult` per recipient. dnspython and aiosmtplib are imported here
and nowhere else.

Finding the hosts (RFC 5321 §5.1, RFC 7505): MX records by preference, equal
preferences shuffled; no MX records → the domain itself (implicit MX); a null MX
(``0 .``) → permanent 5.1.10; NXDOMAIN → permanent 5.1.2; SERVFAIL or timeout →
temporary 4.4.3. Each host's A and AAAA records are tried. Answers are cached for their
TTL (dnspython's cache). With ``remote.smarthost`` set, every domain goes to that one
host instead.

Handing over (RFC 5321, RFC 3207 STARTTLS, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531
SMTPUTF8, RFC 4954 AUTH for the smarthost): one transaction per destination carries all
of its recipients, each recipient gets its own result. The next host is tried when one
refuses the connection, times out, or answers 4xx/5xx to the greeting or EHLO, or when
``tls = "required"`` and it offers no STARTTLS. STARTTLS is used whenever offered
(certificates not verified: opportunistic TLS, as Postfix's ``may`` level). Content
that needs SMTPUTF8 to a host without it fails with 5.6.7 (RFC 6531 §3.4); 8-bit
content to a host without 8BITMIME fails with 5.6.3 (monomail does not downgrade MIME:
every current MTA offers 8BITMIME, and a lossy conversion is worse than a clear bounce).

Connections are kept for ``remote.connection_idle`` after a transaction and reused for
the next message to the same host (Postfix's connection cache). Concurrency is bounded
overall (``remote.max_connections``) and per destination
(``remote.max_connections_per_domain``).

Error handling: every failure becomes a result with a Reply; nothing raises to the
caller. A timeout or a dropped connection after DATA was sent is temporary (the peer
may or may not have the message: at-least-once, never at-most-once).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from .errors import DestinationError, HostError, Reply
from .settings import Config, RemoteConfig

log = logging.getLogger("monomail.remote")


@dataclass(frozen=True, slots=True)
class RemoteResult:
    recipient: str
    reply: Reply
    host: str = ""  # the host that gave the answer, for DSNs (Remote-MTA)

    @property
    def ok(self) -> bool:
        return 200 <= self.reply.code < 300


NULL_MX = Reply(556, "5.1.10", "Recipient domain does not accept mail (null MX)")
NO_DOMAIN = Reply(550, "5.1.2", "Recipient domain does not exist")
NO_HOSTS = Reply(550, "5.1.2", "Recipient domain has no mail hosts")
DNS_TEMP = Reply(451, "4.4.3", "DNS lookup failed, will retry")
UNREACHABLE = Reply(451, "4.4.1", "No mail host answered, will retry")
NEED_UTF8 = Reply(553, "5.6.7", "Remote host does not support SMTPUTF8")
NEED_8BIT = Reply(554, "5.6.3", "Remote host does not support 8BITMIME")
TOO_BIG = Reply(552, "5.3.4", "Message too big for the remote host")
TLS_REQUIRED = Reply(451, "4.7.5", "TLS required but not available from the remote host")
AUTH_FAILED = Reply(451, "4.7.0", "Authentication with the relay host failed")
LOST = Reply(451, "4.4.2", "Connection to the remote host lost, will retry")


def _split_hostport(value: str, default_port: int) -> tuple[str, int]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return value, default_port


class Resolver:
    """MX and address lookups with dnspython's async resolver and TTL cache."""

    def __init__(self, nameservers: tuple[str, ...], timeout: float) -> None:
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            hosts = [_split_hostport(ns, 53) for ns in nameservers]
            r.nameservers = [h for h, _ in hosts]
            r.nameserver_ports = {h: p for h, p in hosts}
        else:
            r = dns.asyncresolver.Resolver()
        r.lifetime = timeout
        r.timeout = timeout
        r.cache = dns.resolver.Cache()
        self.r = r

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer (None for no records). Raises DestinationError."""
        try:
            answer = await self.r.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise DestinationError(NO_DOMAIN, f"{name}: NXDOMAIN") from None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DestinationError(DNS_TEMP, f"{name} {rdtype}: {type(exc).__name__}") from None
        except dns.exception.DNSException as exc:
            raise DestinationError(DNS_TEMP, f"{name} {rdtype}: {exc}") from None
        return answer if answer.rrset is not None else None

    async def mx_hosts(self, domain: str) -> list[str]:
        """Host names to try, in order (implicit MX when there are none)."""
        answer = await self._query(domain, "MX")
        if answer is None:
            return [domain]
        if any(r.exchange == dns.name.root for r in answer):
            raise DestinationError(NULL_MX, f"{domain}: null MX")
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        by_pref: dict[int, list[str]] = defaultdict(list)
        for pref, host in records:
            by_pref[pref].append(host.lower())
        hosts: list[str] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            random.shuffle(group)
            hosts.extend(group)
        return hosts

    async def addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of ``host``; [] when it has none. Temporary errors raise."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        results = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"), return_exceptions=True)
        out: list[str] = []
        temp: DestinationError | None = None
        for res in results:
            if isinstance(res, DestinationError):
                if res.reply.temporary:
                    temp = res
            elif isinstance(res, BaseException):
                raise res
            elif res is not None:
                out.extend(r.address for r in res)
        if not out and temp:
            raise temp
        return out


@dataclass
class _Idle:
    client: aiosmtplib.SMTP
    since: float


class Transport:
    """Sends messages to remote hosts; owns the connection cache and the limits."""

    def __init__(self, config: Config, resolver: Resolver | None = None) -> None:
        self.config = config
        self.rc: RemoteConfig = config.remote
        self.resolver = resolver or Resolver(config.dns.nameservers, config.dns.timeout)
        self._all = asyncio.Semaphore(self.rc.max_connections)
        self._per_dest: dict[str, asyncio.Semaphore] = {}
        self._idle: dict[tuple[str, int], list[_Idle]] = defaultdict(list)
        self._tls = ssl.create_default_context()
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE

    async def close(self) -> None:
        for idles in self._idle.values():
            for idle in idles:
                await _quit(idle.client)
        self._idle.clear()

    # -- where to --------------------------------------------------------------------

    async def _targets(self, domain: str) -> list[tuple[str, str, int]]:
        """(host name, ip, port) in the order to try. Raises DestinationError."""
        if self.rc.smarthost:
            host, port = _split_hostport(self.rc.smarthost, 25)
            names = [host]
        elif domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1].removeprefix("IPv6:")
            return [(domain, literal, self.rc.port)]
        else:
            port = self.rc.port
            names = await self.resolver.mx_hosts(domain)
        targets: list[tuple[str, str, int]] = []
        temp: DestinationError | None = None
        for name in names:
            try:
                targets.extend((name, ip, port) for ip in await self.resolver.addresses(name))
            except DestinationError as exc:
                if exc.reply.temporary:
                    temp = exc
        if not targets:
            if temp:
                raise temp
            raise DestinationError(NO_HOSTS, f"{domain}: no addresses for {', '.join(names)}")
        return targets

    # -- sending ---------------------------------------------------------------------

    async def send(
        self, sender: str, domain: str, recipients: list[str], data: bytes, smtputf8: bool
    ) -> list[RemoteResult]:
        """Deliver ``data`` to ``recipients`` (all in ``domain``); one result each."""
        try:
            targets = await self._targets(domain)
        except DestinationError as exc:
            log.info("%s: %s", domain, exc)
            return [RemoteResult(r, exc.reply) for r in recipients]
        dest = self.rc.smarthost or domain
        sem = self._per_dest.setdefault(dest, asyncio.Semaphore(self.rc.max_connections_per_domain))
        last = UNREACHABLE
        async with sem, self._all:
            for host, ip, port in targets:
                try:
                    return await self._via(host, ip, port, sender, recipients, data, smtputf8)
                except HostError as exc:
                    log.info("%s [%s]:%d: %s", host, ip, port, exc)
                    last = exc.reply
        return [RemoteResult(r, last) for r in recipients]

    async def _via(
        self, host: str, ip: str, port: int, sender: str, recipients: list[str], data: bytes, smtputf8: bool
    ) -> list[RemoteResult]:
        client, reused = await self._connection(host, ip, port)
        try:
            results = await self._transaction(client, host, sender, recipients, data, smtputf8)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError) as exc:
            if reused:  # a cached connection the peer had closed: once more on a fresh one
                return await self._via(host, ip, port, sender, recipients, data, smtputf8)
            raise HostError(LOST, f"connection lost: {exc}") from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            client.close()
            raise HostError(LOST, f"timeout: {exc}") from exc
        self._keep(ip, port, client)
        return results

    async def _connection(self, host: str, ip: str, port: int) -> tuple[aiosmtplib.SMTP, bool]:
        now = time.monotonic()
        idles = self._idle.get((ip, port), [])
        while idles:
            idle = idles.pop()
            if now - idle.since < self.rc.connection_idle and idle.client.is_connected:
                return idle.client, True
            await _quit(idle.client)
        return await self._connect(host, ip, port), False

    def _keep(self, ip: str, port: int, client: aiosmtplib.SMTP) -> None:
        now = time.monotonic()
        for key, idles in list(self._idle.items()):  # close what idled too long, anywhere
            fresh = [i for i in idles if now - i.since < self.rc.connection_idle and i.client.is_connected]
            for stale in idles:
                if stale not in fresh:
                    stale.client.close()
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]
        idles = self._idle[(ip, port)]
        if client.is_connected and self.rc.connection_idle > 0 and len(idles) < self.rc.max_connections_per_domain:
            idles.append(_Idle(client, now))
        else:
            client.close()

    async def _connect(self, host: str, ip: str, port: int) -> aiosmtplib.SMTP:
        rc = self.rc
        client = aiosmtplib.SMTP(
            hostname=ip, port=port, local_hostname=self.config.hostname, timeout=rc.command_timeout,
            start_tls=False, use_tls=False, validate_certs=False,
        )
        try:
            await client.connect(timeout=rc.connect_timeout)
            await client.ehlo()
            tls = False
            if rc.tls != "none" and client.supports_extension("starttls"):
                await client.starttls(tls_context=self._tls, validate_certs=False)
                await client.ehlo()
                tls = True
                ssl_obj = client.get_transport_info("ssl_object")
                log.info("%s [%s]:%d: TLS %s %s", host, ip, port, ssl_obj.version() if ssl_obj else "?",
                         ssl_obj.cipher()[0] if ssl_obj else "")
            if rc.tls == "required" and not tls:
                raise HostError(TLS_REQUIRED, "STARTTLS not offered and tls = required")
            if rc.smarthost and rc.smarthost_username:
                try:
                    await client.login(rc.smarthost_username, rc.smarthost_password)
                except aiosmtplib.SMTPException as exc:
                    raise HostError(AUTH_FAILED, f"AUTH failed: {exc}") from exc
        except HostError:
            client.close()
            raise
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise HostError(_reply(exc.code, exc.message), f"refused: {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            client.close()
            raise HostError(UNREACHABLE, f"{type(exc).__name__}: {exc}") from exc
        return client

    async def _transaction(
        self, client: aiosmtplib.SMTP, host: str, sender: str, recipients: list[str], data: bytes, smtputf8: bool
    ) -> list[RemoteResult]:
        def all_(reply: Reply) -> list[RemoteResult]:
            return [RemoteResult(r, reply, host) for r in recipients]

        ext = client.esmtp_extensions
        needs_utf8 = smtputf8 or not sender.isascii() or any(not r.isascii() for r in recipients)
        if needs_utf8 and "smtputf8" not in ext:
            return all_(NEED_UTF8)
        eight_bit = not data.isascii()
        if eight_bit and "8bitmime" not in ext:
            return all_(NEED_8BIT)
        size = len(data) + data.count(b"\n")  # on the wire, with CRLF
        limit = ext.get("size", "")
        if limit.isdigit() and 0 < int(limit) < size:
            return all_(TOO_BIG)
        options = []
        if "size" in ext:
            options.append(f"SIZE={size}")
        if eight_bit:
            options.append("BODY=8BITMIME")
        if needs_utf8:
            options.append("SMTPUTF8")
        encoding = "utf-8" if needs_utf8 else "ascii"
        try:
            await client.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            await _rset(client)
            return all_(_reply(exc.code, exc.message))
        results: dict[str, RemoteResult] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                await client.rcpt(rcpt, encoding=encoding)
                accepted.append(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                results[rcpt] = RemoteResult(rcpt, _reply(exc.code, exc.message), host)
        if not accepted:
            await _rset(client)
            return [results[r] for r in recipients]
        try:
            response = await client.data(data, timeout=self.rc.data_timeout)
            reply = _reply(response.code, response.message)
        except aiosmtplib.SMTPResponseException as exc:
            reply = _reply(exc.code, exc.message)
        for rcpt in accepted:
            results[rcpt] = RemoteResult(rcpt, reply, host)
        return [results[r] for r in recipients]


def _reply(code: int, message: str) -> Reply:
    """A peer's reply as a Reply; the enhanced code is taken from its text or derived."""
    text = " ".join(message.split())[:400]
    first, _, rest = text.partition(" ")
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == str(code)[0]:
        return Reply(code, first, rest)
    default = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")
    return Reply(code if 200 <= code < 600 else 451, default, text)


async def _rset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except aiosmtplib.SMTPException:
        client.close()


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 2)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()
