"""One delivery attempt for one message: route → transport → an Outcome per recipient.

Job: for each recipient still to do, ask the router for its destinations, write every
distinct local mailbox once (``Return-Path`` and ``Delivered-To`` on top, RFC 5321
§4.4), hand remote destinations to ``remote.Transport`` grouped by domain (one SMTP
transaction per domain), and say per recipient: delivered, temporary failure or
permanent failure. The queue decides what to do with that; this module never touches
the spool.

LMTP (a `Mailbox` with ``lmtp`` set, see ``router``): the mailboxes of one message for one
LMTP target (and one envelope sender) go in one transaction (``lmtp.send``), each with its
own result; nothing is added on top of the message (Dovecot writes ``Return-Path`` from
MAIL FROM and its own ``Delivered-To`` and ``Received``), but a list's ``List-*`` fields.
monomail's own recipes (``filters``, an account's ``.procmailrc``) and the ``.Junk``
folder are not used there: the store filters (Sieve can file ``X-Spam-Flag: YES``). The
DATA form is made in a worker thread (``lmtp.encode``); at most
``remote.max_connections_per_domain`` connections to one target at once. The 250 to our client waits for
the store's answer or the spool, as for any delivery (the queue journals first).

Quarantine: a message that ``inbound`` marked as quarantined (DMARC ``p=quarantine``
failed; `inbound.quarantined`) goes into a Maildir user's ``.Junk`` folder instead of the
inbox; an mbox user's copy carries the ``X-Spam-Flag: YES`` field.

System accounts (``local.system_accounts``; the `Mailbox` carries the account): the
account's ``~/.procmailrc``, when there is one, runs in a child process with the
account's rights (``userchild``, at most ``userchild.MAX_CHILDREN`` at once), whatever
``filters.enabled`` says; what the recipes deliver to DEFAULT, or the whole message when
there are no recipes, is appended here (the server keeps root for this) to the spool
mbox ``<local.mail_spool>/<name>`` through the same group commit, opened with the
account's ownership (``mailstore.Owner``: the account, group ``mail``, 0660; 0600 and its
own group where there is no ``mail`` group). Nothing under the account's home is
touched by this process. Root's recipes are never run (logged: alias root to a person).
A recipe child that fails, or a spool mbox that is not the account's own regular
file, is a temporary failure.

Speed: one trip to a worker thread per message per mailbox (open, write, fsync, rename
together, in ``mailstore``), all destinations of a message in parallel, and concurrent
messages for one mbox file gathered into one locked append with one fsync (group
commit), so fsyncs overlap and the event loop never blocks.

Error handling (DESIGN invariant 2): a routing refusal and a remote 5xx are permanent;
every local transport error is temporary: a locked mailbox (4.2.0), a full disk
(4.3.1), a full quota (4.2.2), anything unclassified (4.3.0). When one recipient has
several destinations, a temporary failure of any of them makes the recipient
temporary (the delivered ones are remembered and skipped on retry). A local error's
reply comes from ``errors.reply_for`` (the one place that maps an exception to a reply);
its cause (path, exception text) goes to the Outcome's ``detail`` for the log, never into
the reply (DESIGN invariant 6). A remote result's reply already names its remote cause
(host, refusal, timeout, the peer's own words; see ``remote``), and its ``detail`` says
the same for the log line with the queue id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import accounts, dkimsig, lmtp, mailstore, userchild
from .envelope import Address, Envelope, Outcome, Spawn, Status
from .errors import Reply, RouteError, reply_for
from .inbound import quarantined
from .message import delivery_headers, header_block
from .remote import Transport
from .resolver import BlockingLookup
from .rewrite import forward_sender, masquerade_address, masquerade_headers
from .router import Destination, ListPost, Mailbox, Remote, Tables, routes
from .settings import Account, Config, LMTPTarget
from .userfilter import UserFilters

DELIVERED = Reply(250, "2.0.0", "Delivered")
NO_REMOTE = Reply(451, "4.4.0", "Remote delivery is not available here")
LIST_LOOP = Reply(250, "2.0.0", "Dropped: the message already went through this list")
LIST_POSTED = Reply(250, "2.0.0", "Posted to the list")
JUNK = ".Junk"  # a Maildir user's folder for quarantined mail (Maildir++: <maildir>/.Junk)
_LIST_ID = re.compile(rb"^List-Id:[^\n]*<([^>\n]+)>", re.IGNORECASE | re.MULTILINE)

log = logging.getLogger("monomail.deliver")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Result:
    """What one destination came to: a 2xx reply is success."""

    reply: Reply
    detail: str
    host: str = ""
    spawns: tuple[Spawn, ...] = ()


_EARLIER = _Result(DELIVERED, "delivered by an earlier attempt")


@dataclass
class _MboxBatch:
    items: list[mailstore.MboxItem] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


def _list_ids(data: bytes) -> set[str]:
    """List-Id values in the message's header section (the list loop guard)."""
    return {m.decode("ascii", "replace").lower() for m in _LIST_ID.findall(header_block(data))}


def _settle(fut: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)  # type: ignore[arg-type]  # (None only with exc)


def in_thread(executor: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``loop.run_in_executor(executor, fn, *args)`` with less on the event loop: the
    worker thread hands the result straight back (``call_soon_threadsafe``), without a
    second future chained to the executor's. A job whose waiter was cancelled before it
    started is not run, as with ``run_in_executor``."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        if fut.cancelled():  # (a read of the future's state from this thread: at worst one job too many)
            return
        try:
            result = fn(*args)
        except BaseException as exc:
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, fut, *outcome)

    executor.submit(run)
    return fut


def _header_lines(headers: tuple[tuple[str, str], ...]) -> bytes:
    return "".join(f"{k}: {v}\n" for k, v in headers).encode("utf-8")


class Deliverer:
    """Delivers messages; owns the mbox group-commit state. One per process."""

    def __init__(self, config: Config, executor: Executor, transport: Transport | None = None,
                 tables: Tables | None = None, signer: dkimsig.Signer | None = None) -> None:
        self.config = config
        self.executor = executor
        self.transport = transport
        self.tables = tables
        self.filters = UserFilters(config) if config.filters.enabled else None
        self.signer = signer  # DKIM keys (``dkimsig.load_signer``); None: mail leaves unsigned
        self._mbox_pending: dict[Path, _MboxBatch] = {}
        self._mbox_writing: set[Path] = set()
        self._mail_gid = accounts.mail_group() if config.local.system_accounts else None
        self._children = asyncio.Semaphore(userchild.MAX_CHILDREN)  # recipe children at once
        self._lmtp_slots: dict[LMTPTarget, asyncio.Semaphore] = {}  # connections per LMTP target

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
        routed: dict[str, list[str]] = {}  # recipient -> its destinations' keys
        refused: dict[str, RouteError] = {}
        jobs: dict[str, Destination] = {}
        for rcpt in recipients:
            try:
                dests = routes(Address.from_str(rcpt), self.config, self.tables)  # as at RCPT time
            except RouteError as exc:
                refused[rcpt] = exc
                continue
            keys = routed[rcpt] = [d.key for d in dests]
            skip = finished.get(rcpt, ())
            for key, d in zip(keys, dests, strict=True):
                if key not in skip:
                    jobs.setdefault(key, d)
        results = await self._run(jobs, env, data)
        outcomes = []
        for rcpt in recipients:
            if rcpt in refused:
                refusal = refused[rcpt]
                status = Status.TEMPORARY if refusal.reply.temporary else Status.PERMANENT  # a :defer: alias
                outcomes.append(Outcome(rcpt, status, refusal.reply, refusal.detail))
                continue
            skip = finished.get(rcpt, ())  # written by an earlier attempt: done, not tried again
            mine = [(key, _EARLIER if key in skip else results[key]) for key in routed[rcpt]]
            done = tuple(key for key, r in mine if r.reply.code < 300)
            failed = [r for _, r in mine if r.reply.code >= 300]
            spawned = tuple(s for _, r in mine for s in r.spawns)
            if not failed:
                where = ", ".join(r.detail for _, r in mine)
                outcomes.append(Outcome(rcpt, Status.DELIVERED, DELIVERED, where, done, spawned=spawned))
                continue
            # One answer per original recipient: temporary wins (retry), then permanent.
            worst = next((f for f in failed if f.reply.temporary), failed[0])
            status = Status.TEMPORARY if worst.reply.temporary else Status.PERMANENT
            outcomes.append(Outcome(rcpt, status, worst.reply, worst.detail, done, worst.host, spawned))
        return outcomes

    async def _run(self, jobs: dict[str, Destination], env: Envelope, data: bytes) -> dict[str, _Result]:
        """Run every transport job at once; a result per destination key."""
        # the List-Ids already on the message, looked for only when a copy goes out for a list
        looped = _list_ids(data) if any(d.via.list_id for d in jobs.values()) else set()
        results: dict[str, _Result] = {}
        work = []
        remote: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[Remote]] = {}
        stores: dict[tuple[LMTPTarget, str, tuple[tuple[str, str], ...]], list[Mailbox]] = {}
        for d in jobs.values():
            if d.via.list_id and d.via.list_id in looped:  # a list never sends back into itself
                results[d.key] = _Result(LIST_LOOP, f"dropped: message already went through list {d.via.list_id}")
            elif isinstance(d, ListPost):
                primary = self.config.local.primary_domain
                members = tuple(m if "@" in m else f"{m}@{primary}" for m in d.members)
                spawn = Spawn(d.via.sender or "", members, _header_lines(d.via.headers))
                results[d.key] = _Result(LIST_POSTED, f"list {d.name}: {len(members)} members", spawns=(spawn,))
            elif isinstance(d, Mailbox) and d.lmtp is not None:
                sender = env.sender if d.via.sender is None else d.via.sender
                stores.setdefault((d.lmtp.target, sender, d.via.headers), []).append(d)
            elif isinstance(d, Mailbox):
                work.append(self._local(d, env, data))
            else:
                remote.setdefault((d.domain, self._outbound_sender(d, env), d.via.headers), []).append(d)
        work += [self._remote(domain, sender, headers, dests, env, data)
                 for (domain, sender, headers), dests in remote.items()]
        work += [self._lmtp(target, sender, headers, boxes, data)
                 for (target, sender, headers), boxes in stores.items()]
        if len(work) == 1:  # the common case, without gather's tasks
            batches = [await work[0]]
        else:
            batches = await asyncio.gather(*work)
        results.update((key, result) for batch in batches for key, result in batch)
        return results

    def _outbound_sender(self, dest: Remote, env: Envelope) -> str:
        """The envelope sender for a copy leaving the host: list bounce address, forwarding
        rewrite, then masquerading (``rewrite``)."""
        sender = env.sender if dest.via.sender is None else dest.via.sender
        if dest.via.forwarder:
            sender = forward_sender(sender, dest.via.forwarder, self.config)
        return masquerade_address(sender, self.config.masquerade) if sender else sender

    async def _local(self, dest: Mailbox, env: Envelope, data: bytes) -> list[tuple[str, _Result]]:
        where = f"{dest.format} {dest.path}"
        sender = env.sender if dest.via.sender is None else dest.via.sender
        chunks = [delivery_headers(sender, dest.address) + _header_lines(dest.via.headers), data]
        spawns: tuple[Spawn, ...] = ()
        if dest.account is not None:
            try:
                return await self._account(dest, dest.account, env, sender, chunks)
            except Exception as exc:  # every local transport error is temporary
                return [(dest.key, _Result(reply_for(exc), f"{where}: {type(exc).__name__}: {exc}"))]
        try:
            if self.filters is not None and self.config.filters.enabled:
                user = self.config.users[dest.user]
                loop = asyncio.get_running_loop()
                filtered = await loop.run_in_executor(
                    self.executor, self.filters.apply, user, b"".join(chunks), sender, env.received_at)
                if filtered is not None:
                    out_sender = forward_sender(sender, user.name, self.config)
                    spawns = tuple(Spawn(out_sender, tuple(a), b"", data=m) for a, m in filtered.forwards)
                    if filtered.delivered:
                        return [(dest.key, _Result(DELIVERED, f"{where} via recipes {user.recipes}", spawns=spawns))]
            if dest.format == "maildir":
                loop = asyncio.get_running_loop()
                folder = dest.path
                if quarantined(data):  # into <maildir>/.Junk (mbox: the flag is in the message)
                    folder = dest.path / JUNK
                    await loop.run_in_executor(self.executor, mailstore.ensure_maildir, dest.path)
                await in_thread(self.executor, mailstore.deliver_maildir, folder, chunks)
            else:
                # a whole-message scan: off the event loop (DESIGN invariant 9)
                chunks[1] = await asyncio.get_running_loop().run_in_executor(self.executor, mailstore.mbox_quote, data)
                await self._mbox(dest.path, (sender, env.received_at, chunks))
        except Exception as exc:  # every local transport error is temporary
            return [(dest.key, _Result(reply_for(exc), f"{where}: {type(exc).__name__}: {exc}"))]
        return [(dest.key, _Result(DELIVERED, where, spawns=spawns))]

    def _owner(self, account: Account) -> mailstore.Owner:
        """A spool mbox's owner: the account, group mail 0660 (0600 with the account's own group
        where there is no mail group)."""
        if self._mail_gid is None:
            return mailstore.Owner(account.uid, account.gid, 0o600)
        return mailstore.Owner(account.uid, self._mail_gid, 0o660)

    async def _account(self, dest: Mailbox, account: Account, env: Envelope, sender: str,
                       chunks: list[bytes]) -> list[tuple[str, _Result]]:
        """A system account: its recipes in a child with its rights (``userchild``), then what
        is left for its spool mbox written here, with its ownership (``mailstore.Owner``)."""
        loop = asyncio.get_running_loop()
        where = f"mbox {dest.path}"
        copies: list[bytes] = []  # whole messages for the spool mbox
        spawns: tuple[Spawn, ...] = ()
        rcfile = account.home / ".procmailrc" if account.home is not None else None
        if rcfile is not None and await loop.run_in_executor(self.executor, os.path.lexists, rcfile):
            if account.is_root:
                log.warning("mail to root: %s is not run (recipes never run as root); alias root to a person "
                            "([aliases] root = [...])", rcfile)
            else:
                async with self._children:
                    result = await userchild.run_recipes_as(account, b"".join(chunks), sender, env.received_at,
                                                            self.config)
                out_sender = forward_sender(sender, account.name, self.config)
                spawns = tuple(Spawn(out_sender, tuple(a), b"", data=m) for a, m in result.forwards)
                copies = list(result.handed_back)
                if result.delivered:
                    where = f"{where} via recipes {rcfile}"
                    if not copies:
                        return [(dest.key, _Result(DELIVERED, where, spawns=spawns))]
                    chunks = []
        if chunks:
            copies.append(b"".join(chunks))
        owner = self._owner(account)
        for copy in copies:
            quoted = await loop.run_in_executor(self.executor, mailstore.mbox_quote, copy)
            await self._mbox(dest.path, (sender, env.received_at, [quoted]), owner)
        return [(dest.key, _Result(DELIVERED, where, spawns=spawns))]

    async def _remote(self, domain: str, sender: str, headers: tuple[tuple[str, str], ...], dests: list[Remote],
                      env: Envelope, data: bytes) -> list[tuple[str, _Result]]:
        if self.transport is None:
            return [(d.key, _Result(NO_REMOTE, "no remote transport")) for d in dests]
        by_address = {d.address: d for d in dests}
        if self.config.masquerade.domains:
            data = masquerade_headers(data, self.config.masquerade)
        if headers:
            data = _header_lines(headers) + data
        if self.signer is not None:  # ARC seal, then DKIM: CPU and DNS work, in a worker thread
            loop = asyncio.get_running_loop()
            seal = functools.partial(dkimsig.outbound, data, self.signer, sender=sender,
                                     lookup=BlockingLookup(self.transport.resolver, loop),
                                     srv_id=self.config.hostname, seal=self.config.checks.arc_seal)
            try:
                data = await loop.run_in_executor(self.executor, seal)
            except Exception:  # never lose mail over a signature: send it unsigned
                log.exception("DKIM signing of mail to %s failed; sending it unsigned", domain)
        try:
            results = await self.transport.send(sender, domain, list(by_address), data, env.smtputf8)
        except Exception as exc:  # unclassified: temporary (DESIGN invariant 2)
            log.exception("remote delivery to %s crashed", domain)
            return [(d.key, _Result(reply_for(exc), f"remote {domain}: {exc!r}")) for d in dests]
        return [
            (by_address[r.recipient].key, _Result(r.reply, f"remote {domain}: {r.detail or r.reply}", r.host))
            for r in results
        ]

    async def _lmtp(self, target: LMTPTarget, sender: str, headers: tuple[tuple[str, str], ...],
                    boxes: list[Mailbox], data: bytes) -> list[tuple[str, _Result]]:
        """One LMTP transaction for ``boxes`` (all for ``target``): a result per mailbox."""
        by_rcpt = {b.lmtp.recipient: b for b in boxes if b.lmtp is not None}
        try:
            payload = await asyncio.get_running_loop().run_in_executor(
                self.executor, lmtp.encode, _header_lines(headers) + data if headers else data)
            limit = self.config.remote.max_connections_per_domain
            slots = self._lmtp_slots.setdefault(target, asyncio.Semaphore(limit))
            async with slots:
                results = await lmtp.send(target, sender, list(by_rcpt), payload, hostname=self.config.hostname,
                                          remote=self.config.remote, smtputf8=not sender.isascii())
        except Exception as exc:  # unclassified: temporary (DESIGN invariant 2)
            log.exception("LMTP delivery to %s crashed", target)
            return [(b.key, _Result(reply_for(exc), f"lmtp {target}: {exc!r}")) for b in boxes]
        return [(by_rcpt[r.recipient].key, _Result(r.reply, r.detail or str(r.reply), target.host))
                for r in results]

    async def _mbox(self, path: Path, item: mailstore.MboxItem, owner: mailstore.Owner | None = None) -> None:
        """Queue ``item`` for ``path``; the first caller writes every waiting item in batches.

        The wait for another program's lock (up to ``local.lock_timeout``) is cut into
        slices of at most half a second in the worker thread, with the loop in between,
        so a cancelled delivery (shutdown) never leaves a thread blocked for the whole
        timeout. Waiters whose writer stopped get a temporary error; cancelled ones are
        left alone."""
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
                        deadline = loop.time() + self.config.local.lock_timeout
                        while True:
                            wait = min(max(deadline - loop.time(), 0.001), 0.5)
                            try:
                                await loop.run_in_executor(
                                    self.executor, mailstore.deliver_mbox, path, todo.items, wait, owner)
                                break
                            except mailstore.MailboxLocked:
                                if loop.time() >= deadline:
                                    raise
                    except Exception as exc:
                        for w in todo.waiters:
                            if not w.done():
                                w.set_exception(exc)
                    except BaseException:  # cancelled: nobody will await our own future
                        for w in todo.waiters:
                            if w is fut:
                                w.cancel()
                            elif not w.done():
                                w.set_exception(OSError("mbox writer stopped"))
                        raise
                    else:
                        for w in todo.waiters:
                            if not w.done():
                                w.set_result(None)
            finally:
                self._mbox_writing.discard(path)
                stranded = self._mbox_pending.pop(path, None)
                for w in stranded.waiters if stranded else ():
                    if not w.done():
                        w.set_exception(OSError("mbox writer stopped"))
        await fut
