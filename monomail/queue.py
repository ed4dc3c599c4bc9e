"""The queue: the promise behind every 250, and the retries of what could not be done.

Job: `Queue.accept` is where the SMTP server hands over a complete message. It tries
delivery at once (the deliver function is handed in; this module never imports
``deliver``), and journals in the spool only the recipients that are not finished,
*before* answering. So the 250 is a promise (DESIGN invariant 1): every recipient is
either delivered durably or journalled durably. A message whose recipients were all
delivered leaves no trace in the spool.

`Queue.run` is the retry runner: it resumes what the spool holds at start-up and
retries deferred recipients on the ``queue.retry`` schedule (time comes from an
injected clock). Per-recipient state lives in the spool record::

    {"address": "alice@example.test", "state": "pending" | "delivered" | "failed",
     "attempts": 2, "next_attempt": 1764339000.0, "last_error": "450 4.2.0 ...",
     "finished": ["mailbox:/var/mail/alice"]}

Error handling: a spool write that fails turns into ``451 4.3.0`` for the client (the
message was not accepted; it will be sent again). Any exception out of the deliver
function counts as a temporary failure of every recipient it was given. The accept
work runs in a task the queue owns, shielded from the SMTP session, so a client that
hangs up mid-delivery cannot tear a delivery in half; `close` waits for those tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from . import maillog
from .config import QueueConfig
from .envelope import Envelope, Outcome, Status
from .errors import LOCAL_ERROR, Reply, SpoolError
from .schedule import next_attempt
from .spool import Record, Spool

log = logging.getLogger("monomail.queue")

DeliverFn = Callable[
    [Envelope, bytes, Sequence[str] | None, Mapping[str, Sequence[str]] | None],
    Awaitable[list[Outcome]],
]
Clock = Callable[[], float]

_seq = itertools.count()


def new_id(now: float | None = None) -> str:
    """A queue id: sortable by time, unique within this host (time, pid, counter)."""
    t = int((time.time() if now is None else now) * 1_000_000)
    return f"{t:013x}{os.getpid() & 0xFFFF:04x}{next(_seq) & 0xFFFF:04x}"


def _record(env: Envelope, outcomes: Sequence[Outcome], now: float, retry: Sequence[float]) -> Record:
    return {
        "id": env.id,
        "sender": env.sender,
        "received_at": env.received_at,
        "smtputf8": env.smtputf8,
        "size": env.size,
        "hold": False,
        "recipients": [_apply({"address": o.recipient, "attempts": 0, "finished": []}, o, now, retry)
                       for o in outcomes],
    }


def _apply(rcpt: dict[str, Any], o: Outcome, now: float, retry: Sequence[float]) -> dict[str, Any]:
    rcpt["attempts"] = rcpt.get("attempts", 0) + 1
    rcpt["finished"] = sorted(set(rcpt.get("finished", [])) | set(o.finished))
    if o.status is Status.DELIVERED:
        rcpt["state"] = "delivered"
        rcpt.pop("next_attempt", None)
    elif o.status is Status.PERMANENT:
        rcpt["state"] = "failed"
        rcpt["last_error"] = str(o.reply)
        rcpt.pop("next_attempt", None)
    else:
        rcpt["state"] = "pending"
        rcpt["last_error"] = str(o.reply)
        rcpt["next_attempt"] = next_attempt(rcpt["attempts"], retry, now)
    return rcpt


def envelope_of(record: Record) -> Envelope:
    return Envelope(
        id=record["id"],
        sender=record["sender"],
        recipients=tuple(r["address"] for r in record["recipients"]),
        received_at=record["received_at"],
        smtputf8=record.get("smtputf8", False),
        size=record.get("size", 0),
    )


def due_time(record: Record) -> float | None:
    """When the entry next needs work, or None (held, or nothing pending)."""
    if record.get("hold"):
        return None
    times = [r.get("next_attempt", 0.0) for r in record["recipients"] if r["state"] == "pending"]
    return min(times) if times else None


class Queue:
    """Accepts messages from the server and retries what is deferred."""

    def __init__(
        self,
        spool: Spool,
        deliver: DeliverFn,
        config: QueueConfig,
        *,
        clock: Clock = time.time,
        concurrency: int = 20,
    ) -> None:
        self.spool = spool
        self.deliver = deliver
        self.config = config
        self.clock = clock
        self._due: dict[str, float] = {}
        self._busy: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(concurrency)

    # -- accepting --------------------------------------------------------------

    async def accept(self, env: Envelope, data: bytes) -> Reply:
        """Deliver now what can be, journal the rest; the reply for DATA."""
        return await asyncio.shield(self._own(self._accept(env, data)))

    def _own(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, env: Envelope, data: bytes) -> Reply:
        try:
            outcomes = await self.deliver(env, data, None, None)
        except Exception as exc:  # unclassified: temporary for everyone
            log.exception("%s: delivery attempt crashed", env.id)
            outcomes = [Outcome(r, Status.TEMPORARY, LOCAL_ERROR, repr(exc)) for r in env.recipients]
        for o in outcomes:
            maillog.outcome(env.id, o)
        if all(o.status is Status.DELIVERED for o in outcomes):
            return Reply(250, "2.0.0", f"OK delivered as {env.id}")
        if all(o.status is Status.PERMANENT for o in outcomes):
            first = outcomes[0].reply
            return Reply(554 if first.code == 550 else first.code, first.status, first.text)
        record = _record(env, outcomes, self.clock(), self.config.retry)
        try:
            await asyncio.to_thread(self.spool.store, record, data)
        except SpoolError as exc:
            maillog.problem(env.id, f"not journalled, answering 451: {exc}")
            return LOCAL_ERROR
        self._schedule(record)
        pending = sum(1 for r in record["recipients"] if r["state"] == "pending")
        if pending:
            maillog.queued(env.id, pending, (due_time(record) or self.clock()) - self.clock())
        return Reply(250, "2.0.0", f"OK queued as {env.id}")

    # -- retrying ---------------------------------------------------------------

    def _schedule(self, record: Record) -> None:
        due = due_time(record)
        if due is None:
            self._due.pop(record["id"], None)
        else:
            self._due[record["id"]] = due
            self._wake.set()

    def load(self) -> int:
        """Read the spool (start-up): drop half-made entries, schedule the rest."""
        self.spool.create()
        for name in self.spool.clean_orphans():
            log.info("spool: removed incomplete %s", name)
        count = 0
        for record in self.spool.records():
            self._schedule(record)
            count += 1
        return count

    def flush(self, qid: str | None = None) -> None:
        """Make everything (or one entry) due now."""
        now = self.clock()
        for key in [qid] if qid else list(self._due):
            if key in self._due:
                self._due[key] = now
        self._wake.set()

    async def run(self) -> None:
        """Retry entries as they fall due, until cancelled."""
        while True:
            now = self.clock()
            for qid in [q for q, t in self._due.items() if t <= now and q not in self._busy]:
                self._busy.add(qid)
                del self._due[qid]
                self._own(self._retry(qid))
            self._wake.clear()
            upcoming = [t for q, t in self._due.items() if q not in self._busy]
            timeout = max(0.0, min(upcoming) - self.clock()) if upcoming else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(timeout, 60.0) if timeout is not None else None)

    async def _retry(self, qid: str) -> None:
        try:
            async with self._slots:
                await self._retry_entry(qid)
        except Exception:
            log.exception("%s: retry failed", qid)
        finally:
            self._busy.discard(qid)

    async def _retry_entry(self, qid: str) -> None:
        try:
            record = await asyncio.to_thread(self.spool.load, qid)
            data = await asyncio.to_thread(self.spool.message, qid)
        except SpoolError as exc:
            maillog.problem(qid, f"cannot read queue entry: {exc}")
            return
        if record.get("hold"):
            return
        now = self.clock()
        todo = [r for r in record["recipients"] if r["state"] == "pending" and r.get("next_attempt", 0) <= now]
        if not todo:
            self._schedule(record)
            return
        env = envelope_of(record)
        addresses = [r["address"] for r in todo]
        finished = {r["address"]: r.get("finished", []) for r in todo}
        try:
            outcomes = await self.deliver(env, data, addresses, finished)
        except Exception as exc:
            log.exception("%s: delivery attempt crashed", qid)
            outcomes = [Outcome(a, Status.TEMPORARY, LOCAL_ERROR, repr(exc)) for a in addresses]
        now = self.clock()
        by_address = {r["address"]: r for r in todo}
        for o in outcomes:
            rcpt = _apply(by_address[o.recipient], o, now, self.config.retry)
            maillog.outcome(qid, o, attempt=rcpt["attempts"])
        if all(r["state"] == "delivered" for r in record["recipients"]):
            await asyncio.to_thread(self.spool.remove, qid)
            maillog.removed(qid, "all recipients delivered")
            return
        await asyncio.to_thread(self.spool.update, record)
        self._schedule(record)

    async def close(self, grace: float) -> None:
        """Wait (bounded) for deliveries in flight, then cancel what is left."""
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
