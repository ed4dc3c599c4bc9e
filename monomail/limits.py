"""Per-client limits: who is "one client", how many connections it holds, how often it failed.

Job: pure bookkeeping the SMTP face consults, with the clock handed in (no I/O).

- `client_key`: the address a limit counts by. An IPv4 address is itself (an
  IPv4-mapped IPv6 address is the IPv4 address); an IPv6 address counts by its /64,
  since one host commonly holds a whole /64 (RFC 6177, as Postfix's
  ``smtpd_client_ipv6_prefix_length`` and Exim's ratelimit masks do).
- `Connections`: concurrent connections per client key (``server.max_connections_per_ip``;
  beyond it the face answers ``421 4.7.0``).
- `FailureWindow`: authentication failures per client key within a sliding window
  (``auth.auth_failures`` per `FAILURE_WINDOW`); while over the limit, every AUTH from that
  client is answered ``421 4.7.0`` until its oldest failure leaves the window. Held in
  memory only, as Postfix's anvil: a restart forgets it (fail2ban keeps the long memory).

Bounded memory: a key with no connections and no failures in the window is dropped, and
the failure table keeps at most `MAX_TRACKED` clients (the oldest are forgotten first).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable

FAILURE_WINDOW = 15 * 60.0  # seconds: the and fail2ban's usual findtime
MAX_TRACKED = 100_000  # clients the failure table remembers at most
IPV6_PREFIX = 64


def client_key(peer_ip: str) -> str:
    """The address limits count by: IPv4 as is, IPv6 as its /64 network."""
    try:
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return peer_ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class Connections:
    """Concurrent connections per client key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count: dict[str, int] = {}

    def open(self, key: str) -> bool:
        """Count a new connection; False (nothing counted) if the client is at its limit."""
        n = self._count.get(key, 0)
        if n >= self.limit:
            return False
        self._count[key] = n + 1
        return True

    def close(self, key: str) -> None:
        n = self._count.get(key, 0) - 1
        if n > 0:
            self._count[key] = n
        else:
            self._count.pop(key, None)

    def count(self, key: str) -> int:
        return self._count.get(key, 0)


class FailureWindow:
    """Failures per client key in the last ``window`` seconds; ``limit`` of them blocks."""

    def __init__(self, limit: int, clock: Callable[[], float], window: float = FAILURE_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        cutoff = self.clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, key: str) -> bool:
        """Has this client failed ``limit`` times within the window?"""
        times = self._recent(key)
        return times is not None and len(times) >= self.limit

    def fail(self, key: str) -> int:
        """Count one failure; the client's failures now in the window."""
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=self.limit)
            while len(self._failures) > MAX_TRACKED:
                self._failures.popitem(last=False)
        self._failures.move_to_end(key)
        times.append(self.clock())
        return len(times)
