"""One delivery attempt for one message: route → transport → an Outcome per recipient.

Job: for each recipient still to do, ask the router for its destinations, write every
distinct local mailbox once (``Return-Path`` and ``Delivered-To`` on top, RFC 5321
§4.4), and say per recipient: delivered, temporary failure or permanent failure. The
queue decides what to do with that; this module never touches the spool.

Speed: one trip to a worker thread per message per mailbox (open, write, fsync, rename
together, in ``mailstore``), all mailboxes of a message in parallel, and concurrent
messages for one mbox file gathered into one locked append with one fsync (group
commit), so fsyncs overlap and the event loop never blocks.

Error handling (DESIGN invariant 2): a routing refusal is permanent; every transport
error is temporary: a locked mailbox (4.2.0), a full disk (4.3.1), a full quota
(4.2.2), anything unclassified (4.3.0). The cause goes to the Outcome's ``detail`` for
the log, never into the reply.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from . import mailstore
from .config import Config
from .envelope import Address, Envelope, Outcome, Status
from .errors import Reply, RouteError
from .message import delivery_headers
from .router import Destination, Mailbox, Remote, resolve

DELIVERED = Reply(250, "2.0.0", "Delivered")
MAILBOX_BUSY = Reply(450, "4.2.0", "Mailbox busy, try again later")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
QUOTA = Reply(452, "4.2.2", "Mailbox full")
LOCAL_FAILURE = Reply(451, "4.3.0", "Local delivery failed, will retry")
NO_REMOTE = Reply(451, "4.4.0", "Remote delivery not available, will retry")


def classify(exc: BaseException) -> Reply:
    """The reply for a transport error. Nothing here is permanent."""
    if isinstance(exc, mailstore.MailboxLocked):
        return MAILBOX_BUSY
    if isinstance(exc, _NoRemote):
        return NO_REMOTE
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return NO_STORAGE
        if exc.errno == errno.EDQUOT:
            return QUOTA
    return LOCAL_FAILURE


@dataclass
class _MboxBatch:
    items: list[mailstore.MboxItem] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Deliverer:
    """Delivers messages; owns the mbox group-commit state. One per process."""

    def __init__(self, config: Config, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self._mbox_pending: dict[Path, _MboxBatch] = {}
        self._mbox_writing: set[Path] = set()

    async def attempt(
        self,
        env: Envelope,
        data: bytes,
        recipients: Sequence[str] | None = None,
        finished: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Outcome]:
        """Try ``recipients`` (default: all of ``env``); ``finished`` holds, per recipient,
        the destination keys an earlier attempt already delivered (skipped now)."""
        recipients = env.recipients if recipients is None else recipients
        finished = finished or {}
        routed: dict[str, tuple[Destination, ...]] = {}
        refused: dict[str, RouteError] = {}
        jobs: dict[str, Destination] = {}
        for rcpt in recipients:
            try:
                dests = resolve(Address.from_str(rcpt), self.config)
            except RouteError as exc:
                refused[rcpt] = exc
                continue
            routed[rcpt] = dests
            skip = set(finished.get(rcpt, ()))
            for d in dests:
                if d.key not in skip:
                    jobs.setdefault(d.key, d)
        keys = list(jobs)
        if len(keys) == 1:  # the common case, without gather's tasks
            try:
                results: list[BaseException | None] = [await self._transport(jobs[keys[0]], env, data)]
            except Exception as exc:
                results = [exc]
        else:
            results = await asyncio.gather(
                *(self._transport(jobs[k], env, data) for k in keys), return_exceptions=True
            )
        errors: dict[str, BaseException] = {
            k: r for k, r in zip(keys, results, strict=True) if isinstance(r, BaseException)
        }
        outcomes = []
        for rcpt in recipients:
            if rcpt in refused:
                exc = refused[rcpt]
                outcomes.append(Outcome(rcpt, Status.PERMANENT, exc.reply, exc.detail))
                continue
            done = tuple(d.key for d in routed[rcpt] if d.key not in errors)
            failed = [(d, errors[d.key]) for d in routed[rcpt] if d.key in errors]
            if not failed:
                where = ", ".join(_describe(d) for d in routed[rcpt])
                outcomes.append(Outcome(rcpt, Status.DELIVERED, DELIVERED, where, done))
            else:
                dest, exc = failed[0]
                detail = f"{_describe(dest)}: {type(exc).__name__}: {exc}"
                outcomes.append(Outcome(rcpt, Status.TEMPORARY, classify(exc), detail, done))
        return outcomes

    async def _transport(self, dest: Destination, env: Envelope, data: bytes) -> None:
        if isinstance(dest, Remote):
            raise _NoRemote("remote delivery is not configured")
        chunks = [delivery_headers(env.sender, dest.address), data]
        loop = asyncio.get_running_loop()
        if dest.format == "maildir":
            await loop.run_in_executor(self.executor, mailstore.deliver_maildir, dest.path, chunks)
        else:
            chunks[1] = mailstore.mbox_quote(data)
            await self._mbox(dest.path, (env.sender, env.received_at, chunks))

    async def _mbox(self, path: Path, item: mailstore.MboxItem) -> None:
        """Queue ``item`` for ``path``; the first caller writes every waiting item in batches."""
        loop = asyncio.get_running_loop()
        batch = self._mbox_pending.setdefault(path, _MboxBatch())
        fut: asyncio.Future[None] = loop.create_future()
        batch.items.append(item)
        batch.waiters.append(fut)
        if path not in self._mbox_writing:
            self._mbox_writing.add(path)
            try:
                while path in self._mbox_pending:
                    todo = self._mbox_pending.pop(path)
                    try:
                        await loop.run_in_executor(
                            self.executor, mailstore.deliver_mbox, path, todo.items,
                            self.config.local.lock_timeout,
                        )
                    except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                        for w in todo.waiters:
                            if not w.done():
                                w.set_exception(exc if isinstance(exc, Exception) else OSError(str(exc)))
                        if not isinstance(exc, Exception):
                            raise
                    else:
                        for w in todo.waiters:
                            if not w.done():
                                w.set_result(None)
            finally:
                self._mbox_writing.discard(path)
                stranded = self._mbox_pending.pop(path, None)
                for w in stranded.waiters if stranded else ():
                    w.set_exception(OSError("mbox writer stopped"))
        await fut


class _NoRemote(Exception):
    pass


def _describe(dest: Destination) -> str:
    if isinstance(dest, Mailbox):
        return f"{dest.format} {dest.path}"
    return f"remote {dest.domain}"
