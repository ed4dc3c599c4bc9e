"""Finding where a domain's mail goes: MX and address lookups in the DNS.

Job: the host names to try for a domain, in order, and each host's addresses, with
dnspython's async resolver (imported here and nowhere else). ``remote`` sends to what
this finds; ``monomail explain`` shows it. Not here: the smarthost, address literals
and SMTP (``remote``).

RFC 5321 §5.1 and RFC 7505: MX records by preference, equal preferences shuffled; no
MX records → the domain itself (implicit MX); a null MX (``0 .``) → permanent 5.1.10;
NXDOMAIN → permanent 5.1.2; SERVFAIL or timeout → temporary 4.4.3. Each host's A and
AAAA records are looked up together. Answers are cached for their TTL (dnspython's
cache).

Error handling: dnspython's exceptions are mapped into monomail's tree in one place,
`Resolver._query` (`DestinationError`, whose reply says whether it is permanent).

For the authentication checks and ``monomail dns`` (SPF, DKIM, DMARC, ARC: RFC 7208,
6376, 7489, 8617), `Resolver.records` answers any of TXT, A, AAAA, MX, PTR, CNAME as
plain values, and `BlockingLookup` lets code in a worker thread (dkimpy, pyspf) ask
through the same resolver and settings (``[dns]``): each question runs on the event
loop, the thread waits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections import defaultdict
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from .errors import DestinationError, Reply


def split_hostport(value: str, default_port: int) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` as (host, port); ``default_port`` without one."""
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
            hosts = [split_hostport(ns, 53) for ns in nameservers]
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
        except dns.resolver.NXDOMAIN as exc:
            raise DestinationError(Reply(550, "5.1.2", f"Domain {name} does not exist (DNS: NXDOMAIN)"),
                                   f"{name} {rdtype}: NXDOMAIN") from exc
        except dns.resolver.NoNameservers as exc:
            # "All nameservers failed to answer the query q: Server ... answered SERVFAIL"
            why = str(exc).partition(": ")[2] or "no name server answered"
            raise DestinationError(Reply(451, "4.4.3", f"DNS lookup of {name} {rdtype} failed: {why}"),
                                   str(exc)) from exc
        except dns.exception.Timeout as exc:
            raise DestinationError(Reply(
                451, "4.4.3", f"DNS lookup of {name} {rdtype} failed: no answer within {self.r.lifetime:g}s"),
                str(exc)) from exc
        except dns.exception.DNSException as exc:
            raise DestinationError(Reply(451, "4.4.3", f"DNS lookup of {name} {rdtype} failed: {exc}"),
                                   f"{name} {rdtype}: {type(exc).__name__}: {exc}") from exc
        return answer if answer.rrset is not None else None

    async def records(self, name: str, rdtype: str) -> list[Any]:
        """The records of ``name``/``rdtype`` as plain values: TXT → bytes (a record's
        strings joined), A/AAAA → address text, MX → (preference, host), PTR and CNAME →
        host (no final dot). [] for NXDOMAIN or no records; `DestinationError` (temporary,
        4.4.3) when the DNS does not answer."""
        try:
            answer = await self._query(name, rdtype)
        except DestinationError as exc:
            if exc.reply.permanent:  # NXDOMAIN
                return []
            raise
        if answer is None:
            return []
        out: list[Any] = []
        for r in answer:
            if rdtype == "TXT":
                out.append(b"".join(r.strings))
            elif rdtype in ("A", "AAAA"):
                out.append(r.address)
            elif rdtype == "MX":
                out.append((r.preference, r.exchange.to_text(omit_final_dot=True).lower()))
            elif rdtype in ("PTR", "CNAME"):
                out.append(r.target.to_text(omit_final_dot=True).lower())
            else:
                out.append(r.to_text())
        return out

    async def mx_hosts(self, domain: str) -> list[str]:
        """Host names to try, in order (implicit MX when there are none)."""
        answer = await self._query(domain, "MX")
        if answer is None:
            return [domain]
        if any(r.exchange == dns.name.root for r in answer):
            raise DestinationError(Reply(556, "5.1.10", f"Domain {domain} does not accept mail (null MX)"),
                                   f"{domain} MX: 0 .")
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


class BlockingLookup:
    """`Resolver.records` for code running in a worker thread (never on the event loop
    itself: it would wait for itself). Raises `DestinationError` as `records` does."""

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop) -> None:
        self.resolver = resolver
        self.loop = loop

    def __call__(self, name: str, rdtype: str) -> list[Any]:
        future = asyncio.run_coroutine_threadsafe(self.resolver.records(name, rdtype), self.loop)
        try:
            return future.result(self.resolver.r.lifetime * 2 + 1)
        except TimeoutError:
            future.cancel()
            raise DestinationError(Reply(451, "4.4.3", f"DNS lookup of {name} {rdtype} failed: no answer"),
                                   f"{name} {rdtype}: timed out in a worker thread") from None
