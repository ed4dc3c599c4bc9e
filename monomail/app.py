"""The composition root: build monomail from a Config, run it, stop it cleanly.

Job: wire spool → deliverer → queue → SMTP server, own every long-lived task, and
handle signals. SIGTERM and SIGINT stop accepting connections, let sessions and
deliveries in flight finish (bounded by ``server.shutdown_grace``), then exit 0.
Start-up also repairs what a crash may have left: half-made spool entries are dropped
(they never got a 250), damaged ones are moved aside (``spool/corrupt/``), mbox files a
dead writer left half-written are truncated, and Maildir ``tmp/`` files older than 36 h
are removed (the Maildir spec's rule).

One spool, one server: ``serve`` takes an exclusive, non-blocking lock on
``<spool>/.serve.lock`` before it touches anything and holds it for the process's life;
a second ``monomail serve`` on the same spool refuses to start (`errors.SpoolBusy`, one
line) and leaves the first one's PID file alone. Modes are set explicitly, never left to
the umask: folders it creates 0700, the log file 0600; the
spool 0711 with its public corner (``localsubmit``: the state file 0644, sockets 0666,
the drop folder 1733).

Not here: SMTP (``server``), retry logic (``queue``), argument parsing (``cli``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import logsetup, mailstore, privileges
from .control import pid_file
from .deliver import Deliverer
from .dkimsig import load_signer
from .errors import ConfigError, SpoolBusy
from .localsubmit import LocalSubmission
from .mboxrewrite import finish_interrupted_rewrite
from .queue import Queue
from .remote import Transport
from .safeio import make_dirs
from .server import SMTPServer
from .settings import Config
from .spool import Spool
from .tables import FileTables
from .tls import Certificates

log = logging.getLogger("monomail")

IO_THREADS = 32  # concurrent mailbox writes: lets fsyncs of many messages overlap


def setup_logging(config: Config) -> None:
    logsetup.setup(config)  # the file, stderr or syslog of [log]; logsetup.reopen() reopens the file


class App:
    """One running monomail."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.drop = privileges.plan(config)  # ConfigError: root without a mode, or server.user unusable
        self.executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="monomail-io")
        self.spool = Spool(config.server.spool_dir)
        self.transport = Transport(config)
        self.tables = FileTables(config.local)
        signer = load_signer(config)  # ConfigError: a DKIM key that cannot be read stops start-up
        self.deliverer = Deliverer(config, self.executor, self.transport, self.tables, signer)
        self.queue = Queue(self.spool, self.deliverer.attempt, config.queue, hostname=config.hostname,
                           cut_through=config.remote.cut_through, clock=clock)
        certificates = Certificates(config.tls) if config.tls.enabled else None  # ConfigError: unusable
        self.server = SMTPServer(config, self.queue, self.tables, certificates=certificates,
                                   resolver=self.transport.resolver)
        self._runner: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._serve_lock: int | None = None  # the fd holding <spool>/.serve.lock
        self.local = LocalSubmission(config, self.spool, self.queue, self.server)  # sockets, drop folder

    async def start(self) -> None:
        """Take the spool, bind the ports, give up root (``server.user``), repair what a
        crash left, start serving and the retry runner. Raises `SpoolBusy` (another server
        has the spool), `ConfigError` (folders that are not ``server.user``'s) or OSError."""
        if self.drop is not None:
            await asyncio.to_thread(privileges.prepare, self.config, self.drop)
        self._serve_lock = await asyncio.to_thread(self.spool.lock_for_serving)
        if self.drop is not None:
            os.fchown(self._serve_lock, self.drop.uid, self.drop.gid)
        for warning in self.config.warnings:
            log.warning("config: %s", warning)
        await self.server.start(serving=False)
        if self.drop is not None:  # bound as root; from here on, never root again
            privileges.drop_to(self.drop)
        await asyncio.to_thread(make_dirs, self.config.local.mail_dir, 0o700)
        await asyncio.to_thread(self._repair_mailboxes)
        pending = await self.queue.load()
        if pending:
            log.info("spool: %d queued message(s) to resume", pending)
        await self.server.serve()
        await self.local.start()  # after the drop: public/, its sockets, the state file; takes the drop folder
        self._runner = asyncio.create_task(self.queue.run(), name="queue-runner")
        log.info("monomail started as %s", self.config.hostname)

    def _repair_mailboxes(self) -> None:
        """Every user's mailbox after a crash (blocking: one worker thread for them all)."""
        for user in self.config.users.values():
            try:
                if user.mailbox_format == "mbox":
                    mailstore.recover_mbox(user.path)
                    # a `monomail mail` killed mid-rewrite left a journal: finish it first
                    finish_interrupted_rewrite(user.path, self.config.local.lock_timeout)
                elif user.path.is_dir():  # what a kill left in tmp/, older than the Maildir spec's 36 h
                    removed = mailstore.clean_maildir_tmp(user.path)
                    if removed:
                        log.info("maildir %s: removed %d stale file(s) from tmp/", user.path, removed)
            except (OSError, mailstore.MailboxLocked) as exc:
                log.warning("%s %s: recovery check failed: %s", user.mailbox_format, user.path, exc)

    @property
    def pid_file(self) -> Path:
        return pid_file(self.config)

    def stop(self) -> None:
        self._stop.set()

    def reload_queue(self) -> None:
        """SIGUSR1 (sent by ``monomail queue flush/hold/release/delete``): re-read the spool
        and look at the drop folder."""
        self.local.wake()
        task = asyncio.ensure_future(self._reload())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _reload(self) -> None:
        count = await self.queue.reload()
        log.info("queue reloaded: %d entries", count)

    async def wait(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Stop within ``server.shutdown_grace`` (sessions and deliveries share it), then
        release the spool. A server that never got the spool touches nothing of it."""
        if self._serve_lock is None:  # start refused (SpoolBusy): nothing of ours runs
            await self.transport.close()
            self.executor.shutdown(wait=False)
            return
        grace = self.config.server.shutdown_grace
        log.info("shutting down (grace %.0fs)", grace)
        deadline = time.monotonic() + grace
        await self.local.close()  # (removes the state file: no client comes to a closing server)
        await self.server.close(grace)
        if self._runner:
            self._runner.cancel()
            await asyncio.wait({self._runner}, timeout=max(0.5, deadline - time.monotonic()))
        await self.queue.close(max(0.5, deadline - time.monotonic()))
        await self.transport.close()
        # Work not started is dropped (its tasks are cancelled); running work is short:
        # mbox lock waits are cut into slices by the deliverer.
        await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)
        if self._serve_lock is not None:
            os.close(self._serve_lock)  # after the PID file: the next server writes its own
            self._serve_lock = None
        log.info("stopped")


async def serve(config: Config) -> int:
    app = App(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    loop.add_signal_handler(signal.SIGUSR1, app.reload_queue)
    try:
        await app.start()
    except (SpoolBusy, ConfigError) as exc:
        if config.log.file:  # else the command line's own one-line error says it
            log.error("cannot start: %s", exc)
        await app.shutdown()
        raise
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await app.shutdown()
        return 1
    await app.wait()
    await app.shutdown()
    return 0


def run(config: Config) -> int:
    """Run the server until a signal stops it; uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))
