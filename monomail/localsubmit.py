"""The server's side of local submission: the public corner of the spool, its sockets,
and the drop folder's pickup.

Job: at start (after ``privileges`` gave up root, so everything here is the server
user's), make ``<spool>/public/`` (``control.make_public``: modes set explicitly), listen
there on the local SMTP socket ``submit`` (a ``server.Session`` of kind ``LOCAL``: the
peer's uid from ``SO_PEERCRED`` is the client) and the ``showq`` socket (each connection
gets the queue listing, ``queue.listing``, as root would see it, then EOF: ``mailq`` for
users who cannot read the spool, as Postfix's showq), write the state file every user
can read, and take what is in the drop folder. Then the drop folder is read again every
`PICKUP_INTERVAL` seconds, and at once on `wake` (SIGUSR1).

Pickup: each finished drop file (``maildrop.collect``: no symlink, regular, one link,
size capped) is journalled with ``Spool.journal_new`` under our Received field, then
removed (a crash in between delivers it twice, never loses it). The file's OWNER
decides the envelope sender, never its words: a trusted owner (``policy.trusted_user``)
gets the sender the file asks for, anyone else their own ``login@primary_domain`` (or
``<>``, which anyone may use). A file that fails a check, does not parse, or belongs to
a uid without a login name is moved into ``<spool>/maildrop.bad/`` (0700; removed when
that fails) with a log line. No error here stops the server: a pickup that fails is
logged and tried again at the next round.

Not here: the SMTP session (``server``), the drop file format (``maildrop``), the
sender rule (``policy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import maildrop
from .control import SHOWQ, SOCKET, SOCKET_MODE, make_public, public_dir, remove_state, write_state
from .envelope import new_id
from .errors import SpoolError
from .localpeer import peer_for_uid
from .maillog import printable
from .policy import local_address
from .queue import Queue, listing
from .sendmail.compose import received_field
from .server import LOCAL, Session, SMTPServer
from .settings import Config
from .spool import Spool

log = logging.getLogger("monomail.pickup")

PICKUP_INTERVAL = 5.0  # seconds between two looks at the drop folder
ENVELOPE_ROOM = 1024 * 1024  # bytes a drop file may hold beyond server.max_message_size
BAD_DIR = "maildrop.bad"
SHOWQ_AT_ONCE = 4  # listings made at the same time at most
SHOWQ_TIMEOUT = 30.0


class LocalSubmission:
    """Owns the local sockets and the pickup task of one running server."""

    def __init__(self, config: Config, spool: Spool, queue: Queue, server: SMTPServer) -> None:
        self.config = config
        self.spool = spool
        self.queue = queue
        self.server = server
        self.drop: Path | None = None
        self.paths: list[Path] = []  # our sockets, removed at close
        self._showq: asyncio.Server | None = None
        self._showq_slots = asyncio.Semaphore(SHOWQ_AT_ONCE)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        """Make the public corner, listen, write the state file, take what was dropped.
        Raises OSError when the public folder cannot be made; a socket that cannot be
        bound is logged (sendmail then uses the drop folder) and start-up goes on."""
        self.drop = await asyncio.to_thread(make_public, self.config)
        public = public_dir(self.config)
        submit = await self._listen(public / SOCKET, self._listen_smtp)
        showq = await self._listen(public / SHOWQ, self._listen_showq)
        await asyncio.to_thread(write_state, self.config, socket=submit, showq=showq)
        self._started = True
        await self.pickup()
        self._task = asyncio.create_task(self._loop(), name="maildrop-pickup")

    async def _listen(self, path: Path, how: Callable[[Path], Awaitable[None]]) -> Path | None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()  # left by a server that was killed
        try:
            await how(path)
            os.chmod(path, SOCKET_MODE)
        except OSError as exc:
            log.error("cannot listen on %s: %s", path, exc)
            return None
        self.paths.append(path)
        log.info("listening on %s (%s)", path, "local submission" if path.name == SOCKET else "queue listing")
        return path

    async def _listen_smtp(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        listener = await loop.create_unix_server(lambda: Session(self.server, LOCAL), path=str(path), backlog=128)
        self.server.servers.append(listener)  # the SMTP server closes it with the others
        self.server.kinds.append(LOCAL)

    async def _listen_showq(self, path: Path) -> None:
        self._showq = await asyncio.start_unix_server(self._serve_showq, path=str(path))

    async def _serve_showq(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self._showq_slots, asyncio.timeout(SHOWQ_TIMEOUT):
                try:
                    lines = await asyncio.to_thread(listing, self.spool, time.time())
                except SpoolError as exc:
                    log.warning("showq: %s", exc)
                    lines = ["the queue cannot be listed now"]
                writer.write("".join(f"{line}\n" for line in lines).encode("utf-8", "replace"))
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            log.info("showq client went away: %r", exc)
        finally:
            writer.close()

    def wake(self) -> None:
        """Look at the drop folder now (SIGUSR1)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PICKUP_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            await self.pickup()

    async def pickup(self) -> int:
        """Journal what is in the drop folder; how many messages. Never raises (but for
        cancellation): a failure is logged and the next round tries again."""
        try:
            count = await asyncio.to_thread(self._pickup)
            if count:
                await self.queue.reload()
            return count
        except Exception as exc:
            log.error("drop folder pickup failed: %r", exc, exc_info=exc)
            return 0

    def _pickup(self) -> int:
        assert self.drop is not None
        limit = self.config.server.max_message_size + ENVELOPE_ROOM
        count = 0
        for item in maildrop.collect(self.drop, limit):
            if isinstance(item, maildrop.Dropped):
                try:
                    if self._take(item):
                        count += 1
                        continue
                except SpoolError as exc:  # the spool, not the file: leave it for the next round
                    log.error("drop file %s not journalled, will retry: %s", item.path.name, exc)
                    continue
                item = maildrop.Bad(item.path, item.owner, f"uid {item.owner} has no login name")
            moved = maildrop.set_aside(item, self.config.server.spool_dir / BAD_DIR)
            log.warning("drop file %s (uid %s) not used: %s; %s", item.path.name, item.owner,
                        printable(item.reason), f"moved to {moved}" if moved else "removed")
        return count

    def _take(self, item: maildrop.Dropped) -> bool:
        """Journal one drop file and remove it; False when its owner cannot send."""
        peer = peer_for_uid(item.owner, self.config)
        own = local_address(peer.name, self.config)
        if peer.trusted or not item.sender:
            sender = item.sender
        elif own is None:
            return False
        else:
            sender = own
            if item.sender.lower() != own.lower():
                log.info("drop file %s: uid %d may not send as <%s>: sender is <%s>", item.path.name,
                         item.owner, printable(item.sender), printable(own))
        now = time.time()
        qid = new_id(now)
        data = received_field(self.config.hostname, item.owner, now, qid) + item.data
        env = self.spool.journal_new(sender, item.recipients, data, now=now, qid=qid)
        item.path.unlink()
        log.info("%s: picked up from the drop folder from=<%s> uid=%d nrcpt=%d size=%d", env.id,
                 printable(sender), item.owner, len(item.recipients), env.size)
        return True

    async def close(self) -> None:
        """Stop the pickup and the showq socket (the SMTP server closes the local SMTP
        listener); remove our sockets and the state file."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
        if self._showq is not None:
            self._showq.close()
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.unlink()
        if self._started:
            await asyncio.to_thread(remove_state, self.config)
