"""Prometheus metrics: the counters, and the HTTP listener that serves them.

Job: one `Metrics` per running server (its own ``CollectorRegistry``, never the process's
default one, so two servers in one process do not collide), fed by observers of what
already happens, and served on ``metrics.listen`` in Prometheus text format (with
``prometheus_client.generate_latest``) by a tiny HTTP/1.1 handler that runs in the
server's own event loop: ``GET /metrics`` answers 200, any other path 404, another
method 405, a bad or over-long request 400; one request per connection, read within
`REQUEST_TIMEOUT`, at most `MAX_REQUEST` bytes, at most `MAX_CLIENTS` at once. No
threads.

The metrics (``_total`` is added by the client library to counters)::

    monomail_messages_received_total                    messages accepted for delivery (maillog "received")
    monomail_deliveries_total{transport,status}         recipients' outcomes (maillog "to=<...> status=")
    monomail_queue_messages                             entries in the queue now
    monomail_smtp_sessions                              SMTP sessions open now
    monomail_smtp_replies_total{code_class}             replies sent to SMTP clients: 2xx 3xx 4xx 5xx
    monomail_delivery_seconds                           how long each delivery attempt of a message took
    monomail_tls_sessions_total                         SMTP sessions that started TLS
    monomail_auth_failures_total                        AUTH attempts refused (535)

``transport`` is ``maildir``, ``mbox``, ``lmtp``, ``smtp`` or ``pipe``, from the outcome's
log detail (``deliver`` writes it), and ``none`` for an outcome decided before any
transport (a routing refusal, a list expansion, an attempt that crashed); ``status`` is
the mail log's word made plain: ``delivered``, ``deferred`` (temporary, retried) or
``bounced`` (permanent). Every event comes from the one place it is logged
(``maillog.observers``); the gauges are read when scraped.

Not here: what is counted where (``maillog``, ``server``'s reply hook, ``app``'s wiring).
prometheus-client is imported here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .envelope import Envelope, Outcome, Status
from .settings import Listen

log = logging.getLogger("monomail.metrics")

TRANSPORTS = ("maildir", "mbox", "lmtp", "smtp", "pipe", "none")
STATUSES = {Status.DELIVERED: "delivered", Status.TEMPORARY: "deferred", Status.PERMANENT: "bounced"}
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx")
AUTH_INVALID_CODE = b"535"  # RFC 4954: authentication credentials invalid
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MAX_REQUEST = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0  # seconds for the whole request
MAX_CLIENTS = 16  # scrapers at once; more are closed at once
SENT_MEMO = 512  # distinct replies whose counting `Metrics.sent` keeps
SENT_MEMO_LENGTH = 512  # longest reply kept so

_PREFIXES = (("maildir", "maildir"), ("mbox", "mbox"), ("lmtp", "lmtp"), ("remote", "smtp"), ("pipe", "pipe"))

T = TypeVar("T")


def transport_of(o: Outcome) -> str:
    """The transport an outcome came from, by its log detail (``deliver``'s words:
    ``"maildir /var/mail/alice"``, ``"mbox ..."``, ``"remote example.org: ..."``)."""
    detail = o.detail.lstrip()
    for prefix, name in _PREFIXES:
        if detail.startswith(prefix + " ") or detail.startswith(prefix + ":"):
            return name
    return "lmtp" if "lmtp" in detail.lower() else "none"  # ("the LMTP store": a socket's path is not said)


def reply_codes(data: bytes | str) -> list[bytes]:
    """The code of each complete reply in what was written to a client (a multi-line
    reply counts once, at its last line)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    codes = []
    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:3].isdigit() and line[:1] in b"2345" and line[3:4] in (b"", b" "):
            codes.append(line[:3])
    return codes


class Metrics:
    """The counters of one running server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("monomail_messages_received", "Messages accepted for delivery", registry=r)
        self.deliveries = Counter("monomail_deliveries", "Recipients' delivery outcomes, by transport and status",
                                  ["transport", "status"], registry=r)
        # the labelled children, looked up once (``labels()`` per event costs the loop)
        self._deliveries = {(transport, status): self.deliveries.labels(transport, status)
                            for transport in TRANSPORTS for status in STATUSES.values()}
        self.queue_messages = Gauge("monomail_queue_messages", "Entries in the queue now", registry=r)
        self.smtp_sessions = Gauge("monomail_smtp_sessions", "SMTP sessions open now", registry=r)
        self.replies = Counter("monomail_smtp_replies", "Replies sent to SMTP clients, by class",
                               ["code_class"], registry=r)
        self._replies = {cls[:1].encode(): self.replies.labels(cls) for cls in CODE_CLASSES}  # b"2" -> 2xx
        self._sent: dict[bytes | str, tuple[Any, ...]] = {}  # a reply as written -> the counters it moves
        self.delivery_seconds = Histogram("monomail_delivery_seconds", "Duration of one delivery attempt of a message",
                                          buckets=DELIVERY_BUCKETS, registry=r)
        self.tls_sessions = Counter("monomail_tls_sessions", "SMTP sessions that started TLS", registry=r)
        self.auth_failures = Counter("monomail_auth_failures", "AUTH attempts refused", registry=r)

    # -- observers ------------------------------------------------------------------

    def mail_event(self, event: str, subject: Envelope | Outcome) -> None:
        """A ``maillog`` observer: ``received`` (an Envelope) or ``outcome`` (an Outcome).
        Called from the event loop and from worker threads (the client's counters lock)."""
        if event == "received":
            self.received.inc()
        elif event == "outcome" and isinstance(subject, Outcome):
            key = (transport_of(subject), STATUSES.get(subject.status, "deferred"))
            child = self._deliveries.get(key)
            (child if child is not None else self.deliveries.labels(*key)).inc()

    def sent(self, data: bytes | str) -> None:
        """What the SMTP server wrote to a client: its replies, by class. Most replies are
        the same few strings: what each counts is kept (up to `SENT_MEMO` of them). A reply
        of one line without CR counts by its first four characters alone (``250 ``)."""
        if isinstance(data, str):
            if "\n" not in data and "\r" not in data:
                data = data[:4]
        elif b"\n" not in data and b"\r" not in data:
            data = data[:4]
        counts = self._sent.get(data)
        if counts is None:
            counts = self._counts(data)
            if len(self._sent) < SENT_MEMO and len(data) <= SENT_MEMO_LENGTH:
                self._sent[data] = counts
        for counter in counts:
            counter.inc()

    def _counts(self, data: bytes | str) -> tuple[Any, ...]:
        out: list[Any] = []
        for code in reply_codes(data):
            out.append(self._replies[code[:1]])
            if code == AUTH_INVALID_CODE:
                out.append(self.auth_failures)
        return tuple(out)

    def tls_started(self) -> None:
        self.tls_sessions.inc()

    def watch(self, *, queue_size: Callable[[], int], sessions: Callable[[], int]) -> None:
        """The gauges, read when scraped."""
        self.queue_messages.set_function(queue_size)
        self.smtp_sessions.set_function(sessions)

    def timed(self, attempt: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """``attempt`` (the deliver function), its every call timed into ``delivery_seconds``."""
        async def timed_attempt(*args: Any, **kwargs: Any) -> T:
            started = time.monotonic()
            try:
                return await attempt(*args, **kwargs)
            finally:
                self.delivery_seconds.observe(time.monotonic() - started)
        return timed_attempt

    def text(self) -> bytes:
        return generate_latest(self.registry)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


class MetricsListener:
    """The HTTP endpoint on ``metrics.listen``, in the running event loop."""

    def __init__(self, metrics: Metrics, listen: Listen) -> None:
        self.metrics = metrics
        self.listen = listen
        self.server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Bind and serve. Raises OSError (address in use, not ours)."""
        self.server = await asyncio.start_server(self._client, self.listen.host, self.listen.port,
                                                 limit=MAX_REQUEST, reuse_address=True)
        log.info("metrics on http://%s/metrics", self.listen)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            if len(self._clients) > MAX_CLIENTS:
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError):
                writer.write(_response("400 Bad Request", b"bad request\n"))
                return
            except TimeoutError:
                return
            writer.write(self._answer(head))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug of ours: this scrape fails, the server goes on
            log.exception("metrics request failed")
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response("400 Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return _response("405 Method Not Allowed", b"only GET\n")
        if target != b"/metrics":
            return _response("404 Not Found", b"not found: try /metrics\n")
        return _response("200 OK", self.metrics.text(), CONTENT_TYPE_LATEST)

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for task in list(self._clients):
            task.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.server.wait_closed()
        self.server = None
