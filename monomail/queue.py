"""The queue: the promise behind every 250, retries, and bounces.

Job: `Queue.accept` is where the SMTP server hands over a complete message. It tries
delivery at once (the deliver function is handed in; this module never imports
``deliver``) and, before answering, journals in the spool whatever is not finished.
So the 250 is a promise (DESIGN invariant 1): every recipient is delivered durably,
journalled durably, or already answered for by a durably journalled bounce. A message
whose recipients were all delivered leaves no trace in the spool.

The immediate attempt is Exim-style cut-through for remote recipients too: the reply
waits for the destination's own answer, up to ``remote.cut_through``. If the attempt
takes longer, the message is journalled as pending, the client gets its 250, and the
attempt's outcome is recorded when it ends (the entry is busy meanwhile, so it is never
tried twice at once). If every recipient fails permanently, the client gets the 5xx
itself and no bounce is made.

`Queue.run` is the retry runner: deferred recipients are retried on the
``queue.retry`` schedule; after ``queue.give_up_after`` they fail. Failures produce an
RFC 3464 bounce to the envelope sender (``dsn``), and a delay warning once after
``queue.warn_after``; both are journalled as new messages from the null sender and
delivered like any other mail. A message from the null sender is never bounced
(DESIGN invariant 7): its failure is logged and dropped. Time comes from an injected
clock, so schedules are tested without waiting.

Per-recipient state lives in the spool record::

    {"address": "bob@remote.test", "state": "pending" | "delivered" | "failed",
     "attempts": 2, "next_attempt": 1764339000.0, "last_error": "450 4.2.0 ...",
     "remote_host": "mx1.remote.test", "finished": ["remote:bob@remote.test"]}

Error handling: a spool write that fails turns into ``451 4.3.0`` for the client. Any
exception out of the deliver function counts as a temporary failure of every recipient
it was given. Accept work runs in tasks the queue owns, shielded from the SMTP session,
so a client that hangs up cannot tear a delivery in half; `close` waits for them.
Record updates take the spool lock and re-read the record, so ``monomail queue``
commands (hold, delete) made while a delivery runs are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from . import maillog
from .dsn import RecipientReport, build_report
from .envelope import Envelope, Outcome, Status, new_id
from .errors import LOCAL_ERROR, Reply, SpoolError
from .schedule import expired, next_attempt
from .settings import QueueConfig
from .spool import Record, Spool, new_record

log = logging.getLogger("monomail.queue")

DeliverFn = Callable[
    [Envelope, bytes, Sequence[str] | None, Mapping[str, Sequence[str]] | None],
    Awaitable[list[Outcome]],
]
Clock = Callable[[], float]

def apply_outcome(rcpt: dict[str, Any], o: Outcome, now: float, retry: Sequence[float]) -> None:
    rcpt["attempts"] = rcpt.get("attempts", 0) + 1
    rcpt["finished"] = sorted(set(rcpt.get("finished", [])) | set(o.finished))
    if o.remote_host:
        rcpt["remote_host"] = o.remote_host
    if o.status is Status.DELIVERED:
        rcpt["state"] = "delivered"
        rcpt.pop("next_attempt", None)
        return
    rcpt["last_error"] = str(o.reply)
    if o.status is Status.PERMANENT:
        rcpt["state"] = "failed"
        rcpt.pop("next_attempt", None)
    else:
        rcpt["state"] = "pending"
        rcpt["next_attempt"] = next_attempt(rcpt["attempts"], retry, now)


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


def _status_of(rcpt: dict[str, Any]) -> str:
    error = rcpt.get("last_error", "")
    parts = error.split(" ", 2)
    return parts[1] if len(parts) > 1 and parts[1][:1] in "45" and parts[1].count(".") == 2 else "4.0.0"


class Queue:
    """Accepts messages from the server, retries what is deferred, bounces what fails."""

    def __init__(
        self,
        spool: Spool,
        deliver: DeliverFn,
        config: QueueConfig,
        *,
        hostname: str,
        cut_through: float = 30.0,
        clock: Clock = time.time,
        concurrency: int = 20,
    ) -> None:
        self.spool = spool
        self.deliver = deliver
        self.config = config
        self.hostname = hostname
        self.cut_through = cut_through
        self.clock = clock
        self._due: dict[str, float] = {}
        self._busy: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(concurrency)

    def _own(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _attempt(
        self, env: Envelope, data: bytes, recipients: Sequence[str] | None, finished: Mapping[str, Sequence[str]] | None
    ) -> list[Outcome]:
        try:
            return await self.deliver(env, data, recipients, finished)
        except Exception as exc:  # unclassified: temporary for everyone
            log.exception("%s: delivery attempt crashed", env.id)
            return [Outcome(r, Status.TEMPORARY, LOCAL_ERROR, repr(exc)) for r in recipients or env.recipients]

    # -- accepting --------------------------------------------------------------

    async def accept(self, env: Envelope, data: bytes) -> Reply:
        """Deliver now what can be, journal the rest; the reply for DATA."""
        return await asyncio.shield(self._own(self._accept(env, data)))

    async def _accept(self, env: Envelope, data: bytes) -> Reply:
        attempt = self._own(self._attempt(env, data, None, None))
        done, _ = await asyncio.wait({attempt}, timeout=self.cut_through)
        if not done:
            return await self._accept_slow(env, data, attempt)
        outcomes = attempt.result()
        for o in outcomes:
            maillog.outcome(env.id, o)
        if any(o.spawned for o in outcomes):
            try:
                self._schedule_all(await asyncio.to_thread(self._store_spawned, env, data, outcomes, self.clock()))
            except SpoolError as exc:
                maillog.problem(env.id, f"list copy not journalled, answering 451: {exc}")
                return LOCAL_ERROR
        if all(o.status is Status.DELIVERED for o in outcomes):
            return Reply(250, "2.0.0", f"OK delivered as {env.id}")
        if all(o.status is Status.PERMANENT for o in outcomes):
            first = outcomes[0].reply
            return Reply(552 if first.code == 552 else 554, first.status, first.text)  # DATA replies: RFC 5321 4.3.2
        now = self.clock()
        record = new_record(env, now)
        by_address = {r["address"]: r for r in record["recipients"]}
        for o in outcomes:
            apply_outcome(by_address[o.recipient], o, now, self.config.retry)
        try:
            self._schedule_all(await asyncio.to_thread(self._journal, record, data, now))
        except SpoolError as exc:
            maillog.problem(env.id, f"not journalled, answering 451: {exc}")
            return LOCAL_ERROR
        pending = sum(1 for r in record["recipients"] if r["state"] == "pending")
        if pending:
            maillog.queued(env.id, pending, (due_time(record) or now) - now)
            return Reply(250, "2.0.0", f"OK queued as {env.id}")
        return Reply(250, "2.0.0", f"OK {env.id}, failures reported to the sender")

    def _store_spawned(self, env: Envelope, data: bytes, outcomes: Sequence[Outcome], now: float) -> list[Record]:
        """Journal the new messages deliveries made (list posts), due now (worker thread)."""
        new = []
        for o in outcomes:
            for spawn in o.spawned:
                body = spawn.data if spawn.data is not None else spawn.prefix + data
                child = Envelope(new_id(now), spawn.sender, spawn.recipients, now, env.smtputf8, len(body))
                record = new_record(child, now)
                self.spool.store(record, body)
                log.info("%s: to=<%s> made %s from=<%s> nrcpt=%d", env.id, o.recipient, child.id, spawn.sender,
                         len(spawn.recipients))
                new.append(record)
        return new

    def _journal(self, record: Record, data: bytes, now: float) -> list[Record]:
        """First journalling of an accepted message (worker thread): bounce what failed,
        store what is pending. Returns the new entries for the loop to schedule."""
        failed = {r["address"] for r in record["recipients"] if r["state"] == "failed"}
        new = self._report(record, data, now, failed_now=failed)
        if any(r["state"] == "pending" for r in record["recipients"]):
            self.spool.store(record, data)
            new.append(record)
        return new

    async def _accept_slow(self, env: Envelope, data: bytes, attempt: asyncio.Task[list[Outcome]]) -> Reply:
        """The attempt outlived the cut-through budget: journal it all, answer, record later."""
        record = new_record(env, self.clock() + self.config.retry[0])
        self._busy.add(env.id)
        try:
            await asyncio.to_thread(self.spool.store, record, data)
        except SpoolError as exc:
            maillog.problem(env.id, f"not journalled, answering 451: {exc}")
            self._busy.discard(env.id)
            return LOCAL_ERROR
        maillog.queued(env.id, len(env.recipients), 0)

        async def finish() -> None:
            try:
                await self._commit(env.id, await attempt)
            finally:
                self._busy.discard(env.id)
                self._wake.set()

        self._own(finish())
        return Reply(250, "2.0.0", f"OK queued as {env.id}")

    # -- recording outcomes, bounces and warnings ---------------------------------

    async def _commit(self, qid: str, outcomes: Sequence[Outcome]) -> None:
        try:
            self._schedule_all(await asyncio.to_thread(self._commit_sync, qid, outcomes, self.clock()))
        except SpoolError as exc:
            maillog.problem(qid, f"cannot record outcome, will retry: {exc}")
            self._due[qid] = self.clock() + self.config.retry[0]

    def _commit_sync(self, qid: str, outcomes: Sequence[Outcome], now: float) -> list[Record]:
        """Worker thread, under the spool lock: merge outcomes into the current record,
        report, save. Returns the records whose schedule changed (the loop applies it)."""
        with self.spool.locked():
            if not self.spool.exists(qid):
                log.info("%s: entry was deleted meanwhile", qid)
                return []
            record = self.spool.load(qid)
            changed: list[Record] = []
            if any(o.spawned for o in outcomes):
                changed = self._store_spawned(envelope_of(record), self.spool.message(qid), outcomes, now)
            by_address = {r["address"]: r for r in record["recipients"]}
            newly_failed = set()
            for o in outcomes:
                rcpt = by_address.get(o.recipient)
                if rcpt is None or rcpt["state"] != "pending":
                    continue
                apply_outcome(rcpt, o, now, self.config.retry)
                maillog.outcome(qid, o, attempt=rcpt["attempts"])
                if rcpt["state"] == "failed":
                    newly_failed.add(o.recipient)
            if expired(record["received_at"], self.config.give_up_after, now):
                for rcpt in record["recipients"]:
                    if rcpt["state"] == "pending":
                        rcpt["state"] = "failed"
                        rcpt["last_error"] = rcpt.get("last_error") or "451 4.4.7 Message expired"
                        rcpt["gave_up"] = True
                        rcpt.pop("next_attempt", None)
                        newly_failed.add(rcpt["address"])
                        log.info("%s: to=<%s> gave up after %.0fs", qid, rcpt["address"], now - record["received_at"])
            data = self.spool.message(qid) if newly_failed or self._warn_due(record, now) else b""
            changed += self._report(record, data, now, failed_now=newly_failed)
            if any(r["state"] == "pending" for r in record["recipients"]):
                self.spool.update(record)
            else:
                self.spool.remove(qid)
                maillog.removed(qid, "no recipients left to try")
            return [*changed, record]

    def _warn_due(self, record: Record, now: float) -> bool:
        after = self.config.warn_after
        return (after is not None and not record.get("warned") and now - record["received_at"] >= after
                and any(r["state"] == "pending" for r in record["recipients"]))

    def _report(self, record: Record, data: bytes, now: float, failed_now: set[str]) -> list[Record]:
        """Journal a bounce for ``failed_now`` and, when due, one delay warning (worker
        thread, durable before return). Returns the new entries."""
        reports = [
            RecipientReport(r["address"], "failed", _status_of(r), r.get("last_error", ""),
                            r.get("remote_host", ""), now)
            for r in record["recipients"] if r["address"] in failed_now
        ]
        if self._warn_due(record, now):
            record["warned"] = True
            until = record["received_at"] + self.config.give_up_after
            reports += [
                RecipientReport(r["address"], "delayed", _status_of(r), r.get("last_error", ""),
                                r.get("remote_host", ""), now, until)
                for r in record["recipients"] if r["state"] == "pending"
            ]
        if not reports:
            return []
        qid, sender = record["id"], record["sender"]
        if not sender:
            maillog.problem(qid, "failure of a message from <> is not reported (never bounce a bounce): "
                                 + ", ".join(r.recipient for r in reports))
            return []
        dsn = build_report(reporting_mta=self.hostname, sender=sender, queue_id=qid,
                           arrival=record["received_at"], reports=reports, original=data, now=now)
        env = Envelope(new_id(now), "", (sender,), now, smtputf8=not sender.isascii(), size=len(dsn))
        bounce = new_record(env, now)
        self.spool.store(bounce, dsn)
        kind = "bounce" if any(r.action == "failed" for r in reports) else "delay warning"
        log.info("%s: %s %s to <%s> for %s", qid, kind, env.id, sender, ", ".join(r.recipient for r in reports))
        return [bounce]

    # -- retrying ---------------------------------------------------------------

    def _schedule(self, record: Record) -> None:
        due = due_time(record)
        if due is None:
            self._due.pop(record["id"], None)
        else:
            self._due[record["id"]] = due
        self._wake.set()

    def _schedule_all(self, records: Sequence[Record]) -> None:
        for record in records:
            self._schedule(record)

    async def load(self) -> int:
        """Read the spool (start-up): drop half-made entries, schedule the rest."""
        def clean() -> None:
            self.spool.create()
            for name in self.spool.clean_orphans():
                log.info("spool: removed incomplete %s", name)

        await asyncio.to_thread(clean)
        return await self.reload()

    def _scan(self) -> tuple[int, dict[str, float]]:
        due: dict[str, float] = {}
        count = 0
        for record in self.spool.records():
            count += 1
            t = due_time(record)
            if t is not None:
                due[record["id"]] = t
        return count, due

    async def reload(self) -> int:
        """Re-read every entry's schedule (after ``monomail queue`` changed the spool)."""
        count, due = await asyncio.to_thread(self._scan)
        self._due = {q: t for q, t in due.items() if q not in self._busy}
        self._wake.set()
        return count

    def flush(self) -> None:
        """Make everything due now."""
        now = self.clock()
        for key in self._due:
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
            timeout = max(0.0, min(upcoming) - self.clock()) if upcoming else 60.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(timeout, 60.0))

    async def _retry(self, qid: str) -> None:
        try:
            async with self._slots:
                await self._retry_entry(qid)
        except Exception:
            log.exception("%s: retry failed", qid)
            self._due[qid] = self.clock() + self.config.retry[0]
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
        outcomes = await self._attempt(env, data, addresses, finished)
        await self._commit(qid, outcomes)

    async def close(self, grace: float) -> None:
        """Wait (bounded) for deliveries in flight, then cancel what is left."""
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
