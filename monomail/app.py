"""The composition root: build monomail from a Config, run it, stop it cleanly.

Job: wire spool → deliverer → queue → SMTP server, own every long-lived task, and
handle signals. SIGTERM and SIGINT stop accepting connections, let sessions and
deliveries in flight finish (bounded by ``server.shutdown_grace``), then exit 0.
Start-up also repairs what a crash may have left: half-made spool entries are dropped
(they never got a 250) and mbox files a dead writer left half-written are truncated.

Not here: SMTP (``server``), retry logic (``queue``), argument parsing (``cli``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import mailstore
from .control import PID_FILE
from .deliver import Deliverer
from .mboxrewrite import finish_interrupted_rewrite
from .queue import Queue
from .remote import Transport
from .server import SMTPServer
from .settings import Config
from .spool import Spool
from .tables import FileTables

log = logging.getLogger("monomail")

IO_THREADS = 32  # concurrent mailbox writes: lets fsyncs of many messages overlap


def setup_logging(config: Config) -> None:
    handler: logging.Handler
    if config.log.file:
        config.log.file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(config.log.file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)


class App:
    """One running monomail."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="monomail-io")
        self.spool = Spool(config.server.spool_dir)
        self.transport = Transport(config)
        self.tables = FileTables()
        self.deliverer = Deliverer(config, self.executor, self.transport, self.tables)
        self.queue = Queue(self.spool, self.deliverer.attempt, config.queue, hostname=config.hostname,
                           cut_through=config.remote.cut_through, clock=clock)
        self.server = SMTPServer(config, self.queue, self.tables)
        self._runner: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        for warning in self.config.warnings:
            log.warning("config: %s", warning)
        self.config.local.mail_dir.mkdir(parents=True, exist_ok=True)
        for user in self.config.users.values():
            if user.mailbox_format == "mbox":
                try:
                    await asyncio.to_thread(mailstore.recover_mbox, user.path)
                    # a `monomail mail` killed mid-rewrite left a journal: finish it first
                    await asyncio.to_thread(finish_interrupted_rewrite, user.path, self.config.local.lock_timeout)
                except (OSError, mailstore.MailboxLocked) as exc:
                    log.warning("mbox %s: recovery check failed: %s", user.path, exc)
        pending = await self.queue.load()
        if pending:
            log.info("spool: %d queued message(s) to resume", pending)
        await self.server.start()
        self.pid_file.write_text(f"{os.getpid()}\n")
        self._runner = asyncio.create_task(self.queue.run(), name="queue-runner")
        log.info("monomail started as %s", self.config.hostname)

    @property
    def pid_file(self) -> Path:
        return self.config.server.spool_dir / PID_FILE

    def stop(self) -> None:
        self._stop.set()

    def reload_queue(self) -> None:
        """SIGUSR1 (sent by ``monomail queue flush/hold/release/delete``): re-read the spool."""
        task = asyncio.ensure_future(self._reload())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _reload(self) -> None:
        count = await self.queue.reload()
        log.info("queue reloaded: %d entries", count)

    async def wait(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        grace = self.config.server.shutdown_grace
        log.info("shutting down (grace %.0fs)", grace)
        await self.server.close(grace)
        if self._runner:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        await self.queue.close(grace)
        await self.transport.close()
        self.executor.shutdown(wait=True)
        if self.pid_file.exists() and self.pid_file.read_text().strip() == str(os.getpid()):
            self.pid_file.unlink(missing_ok=True)
        log.info("stopped")


async def serve(config: Config) -> int:
    app = App(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    loop.add_signal_handler(signal.SIGUSR1, app.reload_queue)
    try:
        await app.start()
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
