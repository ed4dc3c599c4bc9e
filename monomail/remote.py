"""Remote delivery: hand a message to the hosts a domain's mail goes to (SMTP).

Job: for one message and one destination domain, try the domain's hosts in order and
return one `RemoteResult` per recipient. aiosmtplib is imported here and nowhere else.
The hosts come from ``resolver`` (MX, implicit MX, null MX; A and AAAA; the DNS
errors); with ``remote.smarthost`` set, every domain goes to that one host instead.
An address literal (``[192.0.2.1]``) is that host.

Handing over (RFC 5321, RFC 3207 STARTTLS, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531
SMTPUTF8, RFC 4954 AUTH for the smarthost): one transaction per destination carries all
of its recipients, each recipient gets its own result. A peer that refuses EHLO with
5xx is greeted with HELO instead (RFC 5321 §4.1.4); such a peer offers no extensions
(no STARTTLS, SIZE, 8BITMIME or SMTPUTF8). The next host is tried when one refuses the
connection, times out, or answers 4xx/5xx to the greeting or to both EHLO and HELO, or
when ``tls = "required"`` and it offers no STARTTLS. STARTTLS is used whenever offered
(certificates not verified: opportunistic TLS, as Postfix's ``may`` level). Content
that needs SMTPUTF8 to a host without it fails with 5.6.7 (RFC 6531 §3.4); 8-bit
content to a host without 8BITMIME fails with 5.6.3 (monomail does not downgrade MIME:
every current MTA offers 8BITMIME, and a lossy conversion is worse than a clear bounce).

Connections are kept for ``remote.connection_idle`` after a transaction and reused for
the next message to the same host (Postfix's connection cache). Concurrency is bounded
overall (``remote.max_connections``) and per destination
(``remote.max_connections_per_domain``).

Error handling: every failure becomes a result with a Reply; nothing raises to the
caller. aiosmtplib's, the socket's and TLS's exceptions are mapped into monomail's tree in
one place, `_failures` (a host that failed → `HostError`; the peer's refusal of MAIL, RCPT
or DATA → `DeliveryError` carrying the peer's own reply); dnspython's are ``resolver``'s
(`DestinationError`). Every reply names its real cause: the host and
port and what went wrong (``451 4.4.1 connect to mx.example[192.0.2.1]:25: connection
refused``), or the peer's own code and words; when several hosts failed, the last one
is told and how many were tried. These texts are about the remote side only (no local
paths or exception text), so they can go into the queue, the log and a bounce alike.
A timeout or a dropped connection after DATA was sent is temporary (the peer may or may
not have the message: at-least-once, never at-most-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import aiosmtplib

from .errors import DeliveryError, DestinationError, HostError, MonomailError, Reply
from .resolver import Resolver, split_hostport
from .settings import Config, RemoteConfig

log = logging.getLogger("monomail.remote")


@dataclass(frozen=True, slots=True)
class RemoteResult:
    recipient: str
    reply: Reply
    host: str = ""  # the host that gave the answer, for DSNs (Remote-MTA)
    detail: str = ""  # for the log: where and in reply to what (never shown to a client)


def _where(host: str, ip: str, port: int) -> str:
    """``mx1.example[192.0.2.1]:25`` (Postfix's way), or ``192.0.2.1:25`` when there is no name."""
    address = f"[{ip}]" if ":" in ip else ip
    if host.strip("[]").removeprefix("IPv6:") == ip:
        return f"{address}:{port}"
    return f"{host}[{ip}]:{port}"


# -- aiosmtplib, sockets, TLS and timeouts → monomail's tree: this is the only place ------


def _peer_reply(code: int, message: str) -> Reply:
    """A peer's reply as a Reply; the enhanced code is taken from its text or derived."""
    text = " ".join(message.split())[:400]
    first, _, rest = text.partition(" ")
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == str(code)[0]:
        return Reply(code, first, rest)
    default = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")
    return Reply(code if 200 <= code < 600 else 451, default, text)


def _refusal(code: int, message: str) -> Reply:
    """The reply a peer refused a command with; a refusal is never a success (an
    unexpected 2xx/3xx becomes 451 4.5.0, so retrying is the worst that can happen)."""
    reply = _peer_reply(code, message)
    if reply.code < 400:
        return Reply(451, "4.5.0", f"unexpected reply {reply}")
    return reply


@contextlib.contextmanager
def _failures(where: str, doing: str, timeout: float, *, verdict: bool = False) -> Iterator[None]:
    """Map every exception that aiosmtplib, the socket, TLS or a timeout raise inside the
    block into monomail's tree, ``raise ... from exc`` (the cause stays for the log).

    ``doing`` names the step (``"connect"``, ``"EHLO"``, ``"RCPT TO"``...), ``timeout`` the
    limit it ran under. The peer's refusal becomes a `DeliveryError` with the peer's own
    reply when ``verdict`` is set (MAIL, RCPT, DATA: the peer's word on this message),
    and a `HostError` naming the host otherwise. Every other failure is a `HostError`
    (temporary) whose text says where and what: refused, timed out, connection lost, TLS.
    Our own errors and anything unforeseen pass through unchanged.
    """
    try:
        yield
    except MonomailError:
        raise
    except aiosmtplib.SMTPResponseException as exc:
        reply = _refusal(exc.code, exc.message)
        said = f"{where} said: {reply.text} ({'greeting' if doing == 'connect' else f'in reply to {doing}'})"
        if verdict:
            raise DeliveryError(reply, f"{where} said: {reply} (in reply to {doing})") from exc
        raise HostError(Reply(reply.code, reply.status, said)) from exc
    except aiosmtplib.SMTPConnectTimeoutError as exc:
        if isinstance(exc.__cause__, aiosmtplib.SMTPTimeoutError):  # connected; no 220 came
            raise HostError(Reply(451, "4.4.2", f"{where}: timeout after {timeout:g}s waiting for the greeting")) \
                from exc
        raise HostError(Reply(451, "4.4.1", f"connect to {where}: timeout after {timeout:g}s")) from exc
    except TimeoutError as exc:  # aiosmtplib.SMTPTimeoutError too
        raise HostError(Reply(451, "4.4.2", f"{where}: timeout after {timeout:g}s waiting for the reply to {doing}")) \
            from exc
    except aiosmtplib.SMTPConnectError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and not isinstance(cause, aiosmtplib.SMTPException):
            raise HostError(Reply(451, "4.4.1", f"connect to {where}: {_os_reason(cause)}")) from exc
        raise HostError(Reply(451, "4.4.2", f"{where}: connection closed before the greeting")) from exc
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise HostError(Reply(451, "4.4.2", f"{where}: connection lost during {doing}")) from exc
    except ssl.SSLError as exc:
        raise HostError(Reply(451, "4.7.5", f"{where}: TLS failed during {doing}: {exc.reason or exc}")) from exc
    except OSError as exc:
        raise HostError(Reply(451, "4.4.2", f"{where}: {_os_reason(exc)} during {doing}")) from exc
    except aiosmtplib.SMTPException as exc:  # e.g. "no suitable authentication method"
        raise HostError(Reply(451, "4.4.2", f"{where}: {doing} failed: {exc.message}")) from exc


def _os_reason(exc: OSError) -> str:
    """``connection refused``, ``no route to host``...: the socket's own words, lower case."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    # asyncio's strerror is "Connect call failed (...)": the errno's own words say more
    reason = (os.strerror(exc.errno) if exc.errno else exc.strerror) or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:]


# -- SMTP --------------------------------------------------------------------------------


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
            host, port = split_hostport(self.rc.smarthost, 25)
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
            shown = ", ".join(names)
            raise DestinationError(Reply(550, "5.1.2", f"Domain {domain} has no mail host with an address ({shown})"),
                                   f"{domain}: no A or AAAA record for {shown}")
        return targets

    # -- sending ---------------------------------------------------------------------

    async def send(
        self, sender: str, domain: str, recipients: list[str], data: bytes, smtputf8: bool
    ) -> list[RemoteResult]:
        """Deliver ``data`` to ``recipients`` (all in ``domain``); one result each."""
        try:
            targets = await self._targets(domain)
        except DestinationError as exc:
            log.info("%s: %s (%s)", domain, exc.reply, exc.detail)
            return [RemoteResult(r, exc.reply, detail=f"{exc.reply} ({exc.detail})") for r in recipients]
        dest = self.rc.smarthost or domain
        sem = self._per_dest.setdefault(dest, asyncio.Semaphore(self.rc.max_connections_per_domain))
        failed: list[HostError] = []
        async with sem, self._all:
            for host, ip, port in targets:
                try:
                    return await self._via(host, ip, port, sender, recipients, data, smtputf8)
                except HostError as exc:
                    log.info("%s: %s", domain, exc.reply)
                    failed.append(exc)
        last = failed[-1].reply
        if len(failed) > 1:  # the last host's answer, and how many were tried
            last = Reply(last.code, last.status, f"{last.text} (the last of {len(failed)} hosts tried)")
        detail = "; ".join(str(f.reply) for f in failed)
        return [RemoteResult(r, last, detail=detail) for r in recipients]

    async def _via(
        self, host: str, ip: str, port: int, sender: str, recipients: list[str], data: bytes, smtputf8: bool
    ) -> list[RemoteResult]:
        where = _where(host, ip, port)
        client, reused = await self._connection(host, ip, port, where)
        try:
            results = await self._transaction(client, host, where, sender, recipients, data, smtputf8)
        except HostError as exc:
            client.close()
            lost = isinstance(exc.__cause__, ConnectionError) and not isinstance(exc.__cause__, TimeoutError)
            if reused and lost:  # a cached connection the peer had closed: once more on a fresh one
                return await self._via(host, ip, port, sender, recipients, data, smtputf8)
            raise
        except BaseException:
            client.close()
            raise
        self._keep(ip, port, client)
        return results

    async def _connection(self, host: str, ip: str, port: int, where: str) -> tuple[aiosmtplib.SMTP, bool]:
        now = time.monotonic()
        idles = self._idle.get((ip, port), [])
        while idles:
            idle = idles.pop()
            if now - idle.since < self.rc.connection_idle and idle.client.is_connected:
                return idle.client, True
            await _quit(idle.client)
        return await self._connect(host, ip, port, where), False

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

    async def _connect(self, host: str, ip: str, port: int, where: str) -> aiosmtplib.SMTP:
        rc = self.rc
        client = aiosmtplib.SMTP(
            hostname=ip, port=port, local_hostname=self.config.hostname, timeout=rc.command_timeout,
            start_tls=False, use_tls=False, validate_certs=False,
        )
        try:
            with _failures(where, "connect", rc.connect_timeout):
                await client.connect(timeout=rc.connect_timeout)
            esmtp = await self._greet(client, where)
            tls = False
            if rc.tls != "none" and client.supports_extension("starttls"):
                with _failures(where, "STARTTLS", rc.command_timeout):
                    await client.starttls(tls_context=self._tls, validate_certs=False)
                await self._greet(client, where)
                tls = True
                ssl_obj = client.get_transport_info("ssl_object")
                log.info("%s: TLS %s %s", where, ssl_obj.version() if ssl_obj else "?",
                         ssl_obj.cipher()[0] if ssl_obj else "")
            if rc.tls == "required" and not tls:
                why = "offers no STARTTLS" if esmtp else "refused EHLO, so STARTTLS cannot be used"
                raise HostError(Reply(451, "4.7.5", f"{where}: TLS required, but the host {why}"))
            if rc.smarthost and rc.smarthost_username:
                try:
                    with _failures(where, "AUTH", rc.command_timeout):
                        await client.login(rc.smarthost_username, rc.smarthost_password)
                except HostError as exc:  # our credentials or the relay: temporary either way
                    raise HostError(Reply(451, "4.7.0", f"authentication failed: {exc.reply}")) from exc
        except BaseException:
            client.close()
            raise
        return client

    async def _greet(self, client: aiosmtplib.SMTP, where: str) -> bool:
        """EHLO; HELO when the peer refuses EHLO with 5xx (RFC 5321 §4.1.4). True for ESMTP."""
        try:
            with _failures(where, "EHLO", self.rc.command_timeout):
                await client.ehlo()
            return True
        except HostError as exc:
            if not exc.reply.permanent or not client.is_connected:
                raise
            log.info("%s: EHLO refused (%s), trying HELO", where, exc.reply)
        with _failures(where, "HELO", self.rc.command_timeout):
            await client.helo()
        return False

    async def _transaction(
        self, client: aiosmtplib.SMTP, host: str, where: str, sender: str, recipients: list[str], data: bytes,
        smtputf8: bool,
    ) -> list[RemoteResult]:
        timeout = self.rc.command_timeout

        def all_(reply: Reply, detail: str) -> list[RemoteResult]:
            return [RemoteResult(r, reply, host, detail) for r in recipients]

        ext = client.esmtp_extensions
        needs_utf8 = smtputf8 or not sender.isascii() or any(not r.isascii() for r in recipients)
        if needs_utf8 and "smtputf8" not in ext:
            reply = Reply(553, "5.6.7", f"{where} does not support SMTPUTF8")
            return all_(reply, str(reply))
        eight_bit = not data.isascii()
        if eight_bit and "8bitmime" not in ext:
            reply = Reply(554, "5.6.3", f"{where} does not support 8BITMIME")
            return all_(reply, str(reply))
        size = len(data) + data.count(b"\n")  # on the wire, with CRLF
        limit = ext.get("size", "")
        if limit.isdigit() and 0 < int(limit) < size:
            reply = Reply(552, "5.3.4", f"Message too big for {where} ({size} bytes, the limit is {limit})")
            return all_(reply, str(reply))
        options = []
        if "size" in ext:
            options.append(f"SIZE={size}")
        if eight_bit:
            options.append("BODY=8BITMIME")
        if needs_utf8:
            options.append("SMTPUTF8")
        encoding = "utf-8" if needs_utf8 else "ascii"
        try:
            with _failures(where, "MAIL FROM", timeout, verdict=True):
                await _mail(client, sender, options, encoding)
        except HostError:
            raise
        except DeliveryError as exc:
            await _rset(client, where, timeout)
            return all_(exc.reply, exc.detail)
        results: dict[str, RemoteResult] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                with _failures(where, "RCPT TO", timeout, verdict=True):
                    await _rcpt(client, rcpt, encoding)
                accepted.append(rcpt)
            except HostError:
                raise
            except DeliveryError as exc:
                results[rcpt] = RemoteResult(rcpt, exc.reply, host, exc.detail)
        if not accepted:
            await _rset(client, where, timeout)
            return [results[r] for r in recipients]
        try:
            with _failures(where, "DATA", self.rc.data_timeout, verdict=True):
                response = await client.data(data, timeout=self.rc.data_timeout)
            reply = _peer_reply(response.code, response.message)
            detail = f"{where} said: {reply}"
        except HostError:
            raise
        except DeliveryError as exc:
            reply, detail = exc.reply, exc.detail
        for rcpt in accepted:
            results[rcpt] = RemoteResult(rcpt, reply, host, detail)
        return [results[r] for r in recipients]


async def _mail(client: aiosmtplib.SMTP, sender: str, options: list[str], encoding: str) -> None:
    """MAIL FROM, the path written as it was checked at our RCPT (aiosmtplib's ``mail``
    parses it again with ``email.utils``: a tenth of the loop's time when relaying)."""
    args = [b"FROM:<" + sender.encode(encoding) + b">", *(o.encode("ascii") for o in options)]
    response = await client.execute_command(b"MAIL", *args)
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)


async def _rcpt(client: aiosmtplib.SMTP, recipient: str, encoding: str) -> None:
    response = await client.execute_command(b"RCPT", b"TO:<" + recipient.encode(encoding) + b">")
    if response.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)


async def _rset(client: aiosmtplib.SMTP, where: str, timeout: float) -> None:
    try:
        with _failures(where, "RSET", timeout):
            await client.rset()
    except HostError:
        client.close()


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        with _failures(f"{client.hostname}:{client.port}", "QUIT", 2):
            await asyncio.wait_for(client.quit(), 2)
    except HostError:
        client.close()
