"""The queue: the promise behind every 250, retries, and bounces.

Job: `Queue.accept` is where the SMTP server hands over a complete message. It tries
delivery at once (the deliver function is handed in; this module never imports
``deliver``) and, before answering, journals in the spool whatever is not finished.
So the 250 is a promise (DESIGN invariant 1): every recipient is delivered durably,
journalled durably, or already answered for by a durably journalled bounce. A message
whose recipients were all delivered leaves no trace in the spool.

The immediate attempt is Exim-style cut-through for remote recipients too: the reply
waits for the destination's own answer, up to ``remote.cut_through``. If the attempt
takes longer, the message is journalled as deferred, the client gets its 250, and the
attempt's outcome is recorded when it ends (the entry is busy meanwhile, so it is never
tried twice at once). If every recipient fails permanently, the client gets the 5xx
itself and no bounce is made.

`Queue.run` is the retry runner: deferred recipients are retried on the
``queue.retry`` schedule; after ``queue.give_up_after`` they fail. Failures produce an
RFC 3464 bounce to the envelope sender (``dsn``), and a delay warning once after
``queue.warn_after``; both are journalled as new messages from the null sender and
delivered like any other mail. A message from the null sender is never bounced
(DESIGN invariant 7): its failure is logged and dropped. Time comes from an injected
clock, so schedules are tested without waiting. New messages that deliveries make (list
posts, recipe forwards) are journalled by `journal_spawned`, which ``monomail deliver``
uses too.

Per-recipient state is a `record.QueuedRecipient` (state, attempts, next attempt, the
last reply, its cause and remote host); `apply_outcome` is the one place an attempt's
`Outcome` changes it.

Error handling: a spool write that fails turns into ``451 4.3.0`` for the client. Any
exception out of the deliver function counts as a temporary failure of every recipient
it was given. Accept work runs in one task per message that the queue owns and that
answers the SMTP session through a future (the cut-through budget is a timer in it), so
a client that hangs up cannot tear a delivery in half; `close` waits for them.
Record updates take the spool lock and re-read the record, so ``monomail queue``
commands (hold, delete) made while a delivery runs are kept. A record that cannot be
read now (EMFILE, EIO) is retried later, never dropped from the schedule; a damaged one
is moved aside (``spool/corrupt/``) and logged once with its id, and start-up goes on.
The runner is supervised: if its loop raises, that is logged and it restarts after a
short backoff, so retries never stop silently. It wakes at least every `HEARTBEAT`
seconds and calls `Queue.beat` (the app's heartbeat file, for ``monomail status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from . import maillog
from .dsn import RecipientReport, build_report
from .envelope import Envelope, Outcome, Status
from .errors import LOCAL_ERROR, CorruptEntry, Reply, SpoolError
from .inbound import prepend
from .maillog import printable
from .record import QueuedRecipient, QueueEntry, new_entry
from .schedule import duration, expired, next_attempt
from .settings import QueueConfig
from .spool import Spool

log = logging.getLogger("monomail.queue")

DeliverFn = Callable[
    [Envelope, bytes, Sequence[str] | None, Mapping[str, Sequence[str]] | None],
    Awaitable[list[Outcome]],
]
Clock = Callable[[], float]
Due = tuple[str, float | None]  # a queue id and when it next needs work (None: not at all)

EXPIRED = Reply(451, "4.4.7", "Message expired")
RESTART_MIN = 0.5  # seconds before a crashed runner is restarted; doubles up to RESTART_MAX
RESTART_MAX = 30.0
HEARTBEAT = 5.0  # the runner wakes at least this often and calls `Queue.beat` (``monomail status``)


def apply_outcome(r: QueuedRecipient, o: Outcome, now: float, retry: Sequence[float]) -> QueuedRecipient:
    """The recipient's state after one attempt came to ``o``."""
    attempts = r.attempts + 1
    finished = tuple(sorted(set(r.finished) | set(o.finished)))
    if o.status is Status.DELIVERED:
        return replace(r, state=o.status, attempts=attempts, next_attempt=None, reply=o.reply, cause=o.detail,
                       remote_host=o.remote_host or r.remote_host, finished=finished)
    due = next_attempt(attempts, retry, now) if o.status is Status.TEMPORARY else None
    return replace(r, state=o.status, attempts=attempts, next_attempt=due, reply=o.reply, cause=o.detail,
                   remote_host=o.remote_host, finished=finished)


def give_up(r: QueuedRecipient) -> QueuedRecipient:
    """A deferred recipient of a message that grew too old: failed, last reply kept."""
    return replace(r, state=Status.PERMANENT, next_attempt=None, reply=r.reply or EXPIRED, gave_up=True)


def journal_spawned(spool: Spool, env: Envelope, data: bytes, outcomes: Sequence[Outcome],
                    now: float | None = None) -> list[Envelope]:
    """Journal the new messages deliveries of ``env`` made (list posts, recipe forwards),
    each due now: a spawn's own ``data`` when it has one (what the recipes made of the
    message, with its ``Delivered-To``), else its ``prefix`` on top of the original
    ``data``. Blocking; durable before return. Raises `SpoolError`."""
    made = []
    for o in outcomes:
        for spawn in o.spawned:
            body = spawn.data if spawn.data is not None else prepend(spawn.prefix, data)
            child = spool.journal_new(spawn.sender, spawn.recipients, body, smtputf8=env.smtputf8 or None, now=now)
            log.info("%s: to=<%s> made %s from=<%s> nrcpt=%d", env.id, o.recipient, child.id, spawn.sender,
                     len(spawn.recipients))
            made.append(child)
    return made


def recipient_lines(r: QueuedRecipient, now: float) -> list[str]:
    """What an admin needs to know about a recipient that is not delivered yet."""
    lines = []
    if r.reply is not None:
        lines.append(f"last reply: {printable(str(r.reply))}")
    if r.cause and r.cause != str(r.reply):
        lines.append(f"cause: {printable(r.cause)}")
    if r.remote_host:
        lines.append(f"remote host: {printable(r.remote_host)}")
    if r.gave_up:
        lines.append("gave up (message too old)")
    if r.deferred and r.next_attempt is not None:
        lines.append(f"next attempt in {duration(r.next_attempt - now)}")
    return lines


def listing(spool: Spool, now: float) -> list[str]:
    """The queue as ``monomail queue list`` and ``mailq`` print it, a line each (blocking).
    Raises `SpoolError` when the spool cannot be listed."""
    out = []
    rows = damaged = 0
    for name, got in spool.scan():
        if not isinstance(got, QueueEntry):
            kind = "damaged" if isinstance(got, CorruptEntry) else "unreadable"
            out.append(f"{printable(name)}  {kind}: {printable(str(got))}")
            damaged += 1
            continue
        hold = " (held)" if got.hold else ""
        out.append(f"{got.id}  age {duration(now - got.received_at)}  size {spool.message_size(got.id)}"
                   f"  from <{printable(got.sender)}>{hold}")
        for r in got.recipients:
            if r.state is Status.DELIVERED:
                continue
            out.append(f"    {r.state.value:8} <{printable(r.address)}>  attempts {r.attempts}")
            out += [f"      {line}" for line in recipient_lines(r, now)]
        rows += 1
    for d in spool.damaged():
        out.append(f"{printable(d.name)}  damaged, moved to {d.folder}: {printable(d.reason)}")
        damaged += 1
    if rows or damaged:
        out.append(f"-- {rows} message(s) in queue" + (f", {damaged} damaged" if damaged else ""))
    else:
        out.append("queue is empty")
    return out


def _reply_status(r: QueuedRecipient) -> str:
    return r.reply.status if r.reply is not None and r.reply.status else "4.0.0"


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
        self.beat: Callable[[], None] = lambda: None  # the runner's heartbeat (app: `heartbeat.Heartbeat.beat`)

    def _own(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _attempt(
        self, env: Envelope, data: bytes, recipients: Sequence[str] | None, finished: Mapping[str, Sequence[str]] | None
    ) -> list[Outcome]:
        token = maillog.QUEUE_ID.set(env.id)  # lines of deliver and remote start with the queue id (maillog.about)
        try:
            return await self.deliver(env, data, recipients, finished)
        except Exception as exc:  # unclassified: temporary for everyone
            log.exception("%s: delivery attempt crashed", env.id)
            return [Outcome(r, Status.TEMPORARY, LOCAL_ERROR, repr(exc)) for r in recipients or env.recipients]
        finally:
            maillog.QUEUE_ID.reset(token)

    # -- accepting --------------------------------------------------------------

    async def accept(self, env: Envelope, data: bytes) -> Reply:
        """Deliver now what can be, journal the rest; the reply for DATA.

        The work runs in one task the queue owns, which answers through a future: a
        client that hangs up (its session cancelled) cancels only its wait."""
        answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._own(self._answer(env, data, answer))
        return await answer

    async def _answer(self, env: Envelope, data: bytes, answer: asyncio.Future[Reply]) -> None:
        try:
            reply = await self._accept(env, data, answer)
        except Exception as exc:
            if answer.done():  # answered already (cut-through over): nobody else will hear of it
                log.exception("%s: recording the delivery attempt failed", env.id)
            else:
                answer.set_exception(exc)
        except BaseException:  # cancelled (close)
            answer.cancel()
            raise
        else:
            if reply is not None and not answer.done():
                answer.set_result(reply)

    async def _accept(self, env: Envelope, data: bytes, answer: asyncio.Future[Reply]) -> Reply | None:
        """The attempt, in this task; if it outlives ``cut_through``, `_accept_slow`
        journals it all and answers meanwhile, and the outcome is recorded here when it
        comes (None: answered already)."""
        slow: list[asyncio.Task[bool]] = []
        timer = asyncio.get_running_loop().call_later(
            self.cut_through, lambda: slow.append(self._own(self._accept_slow(env, data, answer))))
        try:
            outcomes = await self._attempt(env, data, None, None)
            timer.cancel()
            journalled = bool(slow) and await slow[0]
        except BaseException:  # cancelled (close): the journalled entry is the runner's again
            timer.cancel()
            if slow:
                slow[0].add_done_callback(lambda t: self._slow_done(env.id, t))
            raise
        if slow:
            if journalled:  # (not journalled: the client has its 451, the outcome goes nowhere)
                try:
                    await self._commit(env.id, outcomes, data)
                finally:
                    self._busy.discard(env.id)
                    self._wake.set()
            return None
        for o in outcomes:
            maillog.outcome(env.id, o)
        if any(o.spawned for o in outcomes):
            try:
                made = await asyncio.to_thread(journal_spawned, self.spool, env, data, outcomes, self.clock())
            except SpoolError as exc:
                maillog.problem(env.id, f"list copy not journalled, answering 451: {exc}")
                return LOCAL_ERROR
            self._schedule_all([(e.id, e.received_at) for e in made])
        if all(o.status is Status.DELIVERED for o in outcomes):
            return Reply(250, "2.0.0", f"OK delivered as {env.id}")
        if all(o.status is Status.PERMANENT for o in outcomes):
            first = outcomes[0].reply
            return Reply(552 if first.code == 552 else 554, first.status, first.text)  # DATA replies: RFC 5321 4.3.2
        now = self.clock()
        fresh = new_entry(env, now)
        entry = fresh.updated({o.recipient: apply_outcome(r, o, now, self.config.retry)
                               for o in outcomes if (r := _recipient(fresh, o.recipient)) is not None})
        try:
            entry, changed = await asyncio.to_thread(self._journal, entry, data, now)
        except SpoolError as exc:
            maillog.problem(env.id, f"not journalled, answering 451: {exc}")
            return LOCAL_ERROR
        self._schedule_all(changed)
        if entry.deferred:
            maillog.queued(env.id, len(entry.deferred), (entry.due() or now) - now)
            return Reply(250, "2.0.0", f"OK queued as {env.id}")
        return Reply(250, "2.0.0", f"OK {env.id}, failures reported to the sender")

    def _slow_done(self, qid: str, journal: asyncio.Task[bool]) -> None:
        """The attempt was cancelled after the cut-through journalling began: once that is
        done, the entry is free for the runner."""
        if not journal.cancelled() and journal.exception() is None and journal.result():
            self._busy.discard(qid)
            self._wake.set()

    def _journal(self, entry: QueueEntry, data: bytes, now: float) -> tuple[QueueEntry, list[Due]]:
        """First journalling of an accepted message (worker thread): bounce what failed,
        store what is deferred. Returns the entry and the schedule changes."""
        failed = {r.address for r in entry.recipients if r.state is Status.PERMANENT}
        entry, changed = self._report(entry, data, now, failed_now=failed)
        if entry.deferred:
            self.spool.store(entry, data)
            changed.append((entry.id, entry.due()))
        return entry, changed

    async def _accept_slow(self, env: Envelope, data: bytes, answer: asyncio.Future[Reply]) -> bool:
        """The attempt outlived the cut-through budget: journal it all (busy, so the runner
        leaves it alone until the attempt is recorded) and answer. Says if it is journalled."""
        entry = new_entry(env, self.clock() + self.config.retry[0])
        self._busy.add(env.id)
        try:
            await asyncio.to_thread(self.spool.store, entry, data)
        except SpoolError as exc:
            maillog.problem(env.id, f"not journalled, answering 451: {exc}")
            self._busy.discard(env.id)
            if not answer.done():
                answer.set_result(LOCAL_ERROR)
            return False
        except BaseException:
            self._busy.discard(env.id)
            raise
        maillog.queued(env.id, len(env.recipients), 0)
        if not answer.done():
            answer.set_result(Reply(250, "2.0.0", f"OK queued as {env.id}"))
        return True

    # -- recording outcomes, bounces and warnings ---------------------------------

    async def _commit(self, qid: str, outcomes: Sequence[Outcome], data: bytes) -> None:
        try:
            self._schedule_all(await asyncio.to_thread(self._commit_sync, qid, outcomes, data, self.clock()))
        except CorruptEntry as exc:
            await asyncio.to_thread(self._quarantine, qid, exc)
        except SpoolError as exc:
            maillog.problem(qid, f"cannot record outcome, will retry: {exc}")
            self._due[qid] = self.clock() + self.config.retry[0]

    def _commit_sync(self, qid: str, outcomes: Sequence[Outcome], data: bytes, now: float) -> list[Due]:
        """Worker thread, under the spool lock: merge outcomes into the current record,
        report, save. ``data`` is the message the attempt had (a ``.msg`` never changes).
        Returns the schedule changes (the loop applies them)."""
        with self.spool.locked():
            if not self.spool.exists(qid):
                log.info("%s: entry was deleted meanwhile", qid)
                return [(qid, None)]
            entry = self.spool.load(qid)
            changed: list[Due] = []
            if any(o.spawned for o in outcomes):
                made = journal_spawned(self.spool, entry.envelope, data, outcomes, now)
                changed += [(e.id, e.received_at) for e in made]
            updates: dict[str, QueuedRecipient] = {}
            for o in outcomes:
                r = _recipient(entry, o.recipient)
                if r is None or not r.deferred or o.recipient in updates:
                    continue
                updates[o.recipient] = new = apply_outcome(r, o, now, self.config.retry)
                maillog.outcome(qid, o, attempt=new.attempts)
            entry = entry.updated(updates)
            newly_failed = {a for a, r in updates.items() if r.state is Status.PERMANENT}
            if expired(entry.received_at, self.config.give_up_after, now) and entry.deferred:
                for r in entry.deferred:
                    log.info("%s: to=<%s> gave up after %.0fs; last reply: %s", qid, r.address,
                             now - entry.received_at, r.reply or EXPIRED)
                newly_failed |= {r.address for r in entry.deferred}
                entry = entry.updated({r.address: give_up(r) for r in entry.deferred})
            entry, reported = self._report(entry, data, now, failed_now=newly_failed)
            changed += reported
            if entry.deferred:
                self.spool.update(entry)
            else:
                self.spool.remove(qid)
                maillog.removed(qid, "no recipients left to try")
            return [*changed, (qid, entry.due())]

    def _warn_due(self, entry: QueueEntry, now: float) -> bool:
        after = self.config.warn_after
        return (after is not None and not entry.warned and now - entry.received_at >= after
                and bool(entry.deferred))

    def _report(self, entry: QueueEntry, data: bytes, now: float,
                failed_now: Collection[str]) -> tuple[QueueEntry, list[Due]]:
        """Journal a bounce for ``failed_now`` and, when due, one delay warning (worker
        thread, durable before return). Returns the entry (``warned`` set) and the new
        entries' schedule."""
        age = now - entry.received_at
        reports = [
            RecipientReport(r.address, "failed", _reply_status(r), str(r.reply or ""), r.remote_host, now,
                            gave_up_after=age if r.gave_up else None)
            for r in entry.recipients if r.address in failed_now
        ]
        if self._warn_due(entry, now):
            entry = replace(entry, warned=True)
            until = entry.received_at + self.config.give_up_after
            reports += [
                RecipientReport(r.address, "delayed", _reply_status(r), str(r.reply or ""), r.remote_host, now, until)
                for r in entry.deferred
            ]
        if not reports:
            return entry, []
        qid, sender = entry.id, entry.sender
        if not sender:
            maillog.problem(qid, "failure of a message from <> is not reported (never bounce a bounce): "
                                 + ", ".join(r.recipient for r in reports))
            return entry, []
        dsn = build_report(reporting_mta=self.hostname, sender=sender, queue_id=qid,
                           arrival=entry.received_at, reports=reports, original=data, now=now)
        bounce = self.spool.journal_new("", (sender,), dsn, now=now)
        kind = "bounce" if any(r.action == "failed" for r in reports) else "delay warning"
        log.info("%s: %s %s to <%s> for %s", qid, kind, bounce.id, sender, ", ".join(r.recipient for r in reports))
        return entry, [(bounce.id, now)]

    def _quarantine(self, name: str, exc: SpoolError) -> None:
        """Move a damaged entry aside and say so, once (worker thread). Looked at again
        under the spool lock first: an entry removed or rewritten meanwhile is left alone."""
        try:
            with self.spool.locked():
                still = self.spool.inspect(name)
                if not isinstance(still, CorruptEntry):
                    return
                where = self.spool.quarantine(name, str(still))
        except (SpoolError, OSError) as err:
            maillog.problem(name, f"{exc}; cannot move it aside: {err}")
            return
        maillog.problem(name, f"{still}; moved to {where}")

    # -- retrying ---------------------------------------------------------------

    def _schedule(self, qid: str, due: float | None) -> None:
        if due is None:
            self._due.pop(qid, None)
        else:
            self._due[qid] = due
        self._wake.set()

    def _schedule_all(self, changes: Sequence[Due]) -> None:
        for qid, due in changes:
            self._schedule(qid, due)

    async def load(self) -> int:
        """Read the spool (start-up): drop half-made entries, move damaged ones aside,
        schedule the rest. Never fails for one entry's sake."""
        def clean() -> None:
            self.spool.create()
            for name in self.spool.clean_orphans():
                log.info("spool: removed incomplete %s", name)

        await asyncio.to_thread(clean)
        return await self.reload()

    def _scan(self, busy: Collection[str], now: float) -> tuple[int, dict[str, float]]:
        due: dict[str, float] = {}
        count = 0
        for name, got in self.spool.scan():
            if isinstance(got, QueueEntry):
                count += 1
                if (t := got.due()) is not None:
                    due[name] = t
            elif name in busy:
                continue
            elif isinstance(got, CorruptEntry):
                self._quarantine(name, got)
            else:  # cannot be read now: try again later, do not forget it
                count += 1
                maillog.problem(name, f"{got}; will try again")
                due[name] = now + self.config.retry[0]
        return count, due

    async def reload(self) -> int:
        """Re-read every entry's schedule (after ``monomail queue`` changed the spool)."""
        count, due = await asyncio.to_thread(self._scan, frozenset(self._busy), self.clock())
        self._due = {q: t for q, t in due.items() if q not in self._busy}
        self._wake.set()
        return count

    @property
    def size(self) -> int:
        """Entries in the queue now: due later or being worked on (held ones are not counted)."""
        return len(self._due.keys() | self._busy)

    def flush(self) -> None:
        """Make everything due now."""
        now = self.clock()
        for key in self._due:
            self._due[key] = now
        self._wake.set()

    async def run(self) -> None:
        """Retry entries as they fall due, until cancelled. The loop is supervised: if it
        raises, the error is logged and it restarts after a backoff (0.5 s, doubling to
        30 s; back to 0.5 s after a minute without trouble)."""
        backoff = RESTART_MIN
        while True:
            started = time.monotonic()
            try:
                await self._run_loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue runner failed; restarting it in %.1fs", backoff)
            if time.monotonic() - started > 60:
                backoff = RESTART_MIN
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX)

    async def _run_loop(self) -> None:
        while True:
            self.beat()
            now = self.clock()
            for qid in [q for q, t in self._due.items() if t <= now and q not in self._busy]:
                self._busy.add(qid)
                del self._due[qid]
                self._own(self._retry(qid))
            self._wake.clear()
            upcoming = [t for q, t in self._due.items() if q not in self._busy]
            timeout = max(0.0, min(upcoming) - self.clock()) if upcoming else 60.0
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that
            # lands just as the event is set, and the runner would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout, HEARTBEAT)):
                    await self._wake.wait()

    async def _retry(self, qid: str) -> None:
        try:
            async with self._slots:
                await self._retry_entry(qid)
        except Exception:
            log.exception("%s: retry failed, will try again", qid)
            self._due[qid] = self._now() + self.config.retry[0]
        finally:
            self._busy.discard(qid)
            self._wake.set()

    async def _retry_entry(self, qid: str) -> None:
        try:
            entry, data = await asyncio.to_thread(lambda: (self.spool.load(qid), self.spool.message(qid)))
        except CorruptEntry as exc:
            await asyncio.to_thread(self._quarantine, qid, exc)
            return
        except SpoolError as exc:
            if not await asyncio.to_thread(self._still_there, qid):
                log.info("%s: entry was deleted meanwhile", qid)
                return
            maillog.problem(qid, f"{exc}; will try again")
            self._due[qid] = self.clock() + self.config.retry[0]
            return
        if entry.hold:
            return
        now = self.clock()
        todo = [r for r in entry.deferred if (r.next_attempt or 0.0) <= now]
        if not todo:
            self._schedule(qid, entry.due())
            return
        addresses = [r.address for r in todo]
        finished = {r.address: r.finished for r in todo}
        outcomes = await self._attempt(entry.envelope, data, addresses, finished)
        await self._commit(qid, outcomes, data)

    def _now(self) -> float:
        """The injected clock, or the system's if it fails (for error paths that must not)."""
        try:
            return self.clock()
        except Exception:
            return time.time()

    def _still_there(self, qid: str) -> bool:
        try:
            return self.spool.exists(qid)
        except OSError:
            return True  # cannot tell: keep it

    async def close(self, grace: float) -> None:
        """Wait (bounded) for deliveries in flight, then cancel what is left."""
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)


def _recipient(entry: QueueEntry, address: str) -> QueuedRecipient | None:
    return next((r for r in entry.recipients if r.address == address), None)
