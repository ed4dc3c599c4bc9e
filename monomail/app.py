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

Metrics (``metrics``): every App has its own counters; with ``metrics.listen`` set they
are served over HTTP (bound with the other ports) and fed by the mail log's observers
while it runs. The queue runner's heartbeat (``heartbeat``, ``public/heartbeat``) is made
at start; ``monomail status`` reads it.

SIGHUP (and ``monomail reload``, which sends it and reads the answer): the log file is
reopened at once (logrotate has moved it), then the config file is read again in a
worker thread (``reload``). A valid new config takes over in one place,
`App.reload_config`, for new sessions and new deliveries; sessions in flight keep the
one they started with, accepted messages stay as they are. An invalid one is refused
with the line ``check-config`` prints, in the log and in the answer, and the old config
stays. SIGUSR1 re-reads the queue.

Not here: SMTP (``server``), retry logic (``queue``), argument parsing (``cli``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import logsetup, maillog, mailstore, privileges, reload
from .auth import Authenticator
from .control import ReloadResult, pid_file, write_reload_result
from .deliver import Deliverer
from .dkimsig import load_signer
from .errors import ConfigError, SpoolBusy
from .heartbeat import Heartbeat, heartbeat_file
from .localsubmit import LocalSubmission
from .mboxrewrite import finish_interrupted_rewrite
from .metrics import Metrics, MetricsListener
from .queue import Queue
from .remote import Transport
from .safeio import make_dirs
from .server import SMTPServer
from .settings import Config
from .spool import Spool
from .tables import FileTables
from .tls import Certificates
from .userfilter import UserFilters

log = logging.getLogger("monomail")

IO_THREADS = 32  # concurrent mailbox writes: lets fsyncs of many messages overlap


def setup_logging(config: Config) -> None:
    logsetup.setup(config)  # the file, stderr or syslog of [log]; logsetup.reopen() reopens the file


def reopen_log(config: Config) -> None:
    """SIGHUP: the log anew at the configured path (logrotate moved the old file away);
    the old handlers are closed. On failure the old ones stay, and say why."""
    old = logging.getLogger().handlers[:]
    try:
        setup_logging(config)
    except OSError as exc:
        logging.getLogger().handlers[:] = old
        log.error("cannot reopen the log file %s, going on with the old one: %s", config.log.file, exc)
        return
    for handler in old:
        handler.close()


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
        self.metrics = Metrics()  # issue 12: this server's counters, served on metrics.listen
        self.queue = Queue(self.spool, self.metrics.timed(self.deliverer.attempt), config.queue,
                           hostname=config.hostname, cut_through=config.remote.cut_through, clock=clock)
        certificates = Certificates(config.tls) if config.tls.enabled else None  # ConfigError: unusable
        self.server = SMTPServer(config, self.queue, self.tables, certificates=certificates,
                                   resolver=self.transport.resolver)
        self.server.metrics = self.metrics
        self.metrics.watch(queue_size=lambda: self.queue.size, sessions=lambda: len(self.server.sessions))
        listen = config.metrics.listen
        self.metrics_listener = MetricsListener(self.metrics, listen) if listen is not None else None
        self.heartbeat = Heartbeat(heartbeat_file(config))  # the runner's, for `monomail status`
        self.queue.beat = self.heartbeat.beat
        self._retired: list[Transport] = []  # replaced by a reload: closed at shutdown
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False  # a SIGHUP came while a reload ran (or before the start)
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
        if self.metrics_listener is not None:  # bound with the other ports (as root, if started so)
            await self.metrics_listener.start()
            maillog.observers.append(self.metrics.mail_event)
        if self.drop is not None:  # bound as root; from here on, never root again
            privileges.drop_to(self.drop)
        await asyncio.to_thread(make_dirs, self.config.local.mail_dir, 0o700)
        await asyncio.to_thread(self._repair_mailboxes)
        pending = await self.queue.load()
        if pending:
            log.info("spool: %d queued message(s) to resume", pending)
        await self.server.serve()
        await self.local.start()  # after the drop: public/, its sockets, the state file; takes the drop folder
        try:
            await asyncio.to_thread(self.heartbeat.create)
        except OSError as exc:  # the runner's beats try again; `monomail status` says stale meanwhile
            log.warning("heartbeat %s: %s", self.heartbeat.path, exc)
        self._runner = asyncio.create_task(self.queue.run(), name="queue-runner")
        log.info("monomail started as %s", self.config.hostname)
        if self._reload_again:
            self.hangup()

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
        self._spawn(self._reload())

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _reload(self) -> None:
        count = await self.queue.reload()
        log.info("queue reloaded: %d entries", count)

    def hangup(self) -> None:
        """SIGHUP: reopen the log now, then read the config file again (one reload at a
        time; a SIGHUP during one asks for one more after it)."""
        reopen_log(self.config)
        if self._stop.is_set():
            return
        if self._runner is None or (self._reloading is not None and not self._reloading.done()):
            self._reload_again = True  # not started yet, or a reload is running
            return
        self._reloading = asyncio.create_task(self._reload_while_asked(), name="config-reload")

    async def _reload_while_asked(self) -> None:
        while True:
            self._reload_again = False
            await self.reload_config()
            if not self._reload_again or self._stop.is_set():
                return

    async def reload_config(self) -> ReloadResult:
        """Read the config file again. Valid: it takes over for new sessions and new
        deliveries (`_swap`). Invalid: refused, logged with the line ``check-config``
        prints, and the old config stays. The answer is written for ``monomail reload``."""
        started = time.monotonic_ns()
        warnings: tuple[str, ...] = ()
        error = ""
        try:
            fresh, warnings = await asyncio.to_thread(reload.prepare, self.config, self.config.path)
        except ConfigError as exc:
            error = f"config error: {exc}"
        except Exception as exc:  # a bug of ours: the old config stays, the server goes on
            log.error("reload failed: %r", exc, exc_info=exc)
            error = f"internal error: {type(exc).__name__}: {exc}"
        else:
            warnings += await self._swap(fresh)
        if error:
            log.error("reload refused, keeping the old config: %s", error)
        else:
            for warning in warnings:
                log.warning("reload: %s", warning)
            log.info("config reloaded from %s", self.config.path)
        result = ReloadResult(os.getpid(), started, not error, error, warnings)
        try:
            await asyncio.to_thread(write_reload_result, self.config, result)
        except OSError as exc:
            log.error("cannot write the reload answer: %s", exc)
        return result

    async def _swap(self, fresh: reload.Fresh) -> tuple[str, ...]:
        """The one place a new config takes over: every piece that holds settings gets the
        new ones for its next piece of work. What runs keeps what it holds (a session its
        settings, a delivery its transport); a replaced transport is closed at shutdown."""
        old, new = self.config, fresh.config
        resolver = self.transport.resolver if (new.dns == old.dns) else None
        if resolver is None or new.remote != old.remote:
            self._retired.append(self.transport)
            self._spawn(self.transport.close())  # its idle connections now; its busy ones at shutdown
            self.transport = Transport(new, resolver)
        else:
            self.transport.config = new
        if new.local != old.local:
            self.tables = FileTables(new.local)
        d = self.deliverer
        d.config, d.transport, d.tables, d.signer = new, self.transport, self.tables, fresh.signer
        d.filters = UserFilters(new) if new.filters.enabled else None
        q = self.queue
        q.config, q.hostname, q.cut_through = new.queue, new.hostname, new.remote.cut_through
        s = self.server
        s.config, s.tables, s.certificates, s.resolver = new, self.tables, fresh.certificates, self.transport.resolver
        if new.auth != old.auth:
            s.auth = Authenticator(new.auth)
        s.per_client.limit = new.server.max_connections_per_ip
        s.failures.limit = new.auth.auth_failures
        self.local.config = new
        self.config = new
        if new.log != old.log:
            reopen_log(new)
        return await reload.sync_listeners(self.server, new)

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
        if self._reloading is not None:
            self._reloading.cancel()
            await asyncio.wait({self._reloading}, timeout=5)
        await self.local.close()  # (removes the state file: no client comes to a closing server)
        if self.metrics_listener is not None:
            await self.metrics_listener.close()
        await self.server.close(grace)
        if self._runner:
            self._runner.cancel()
            await asyncio.wait({self._runner}, timeout=max(0.5, deadline - time.monotonic()))
        await self.queue.close(max(0.5, deadline - time.monotonic()))
        for transport in (*self._retired, self.transport):
            await transport.close()
        # Work not started is dropped (its tasks are cancelled); running work is short:
        # mbox lock waits are cut into slices by the deliverer.
        await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)
        if self._serve_lock is not None:
            os.close(self._serve_lock)  # after the PID file: the next server writes its own
            self._serve_lock = None
        if self.metrics.mail_event in maillog.observers:
            maillog.observers.remove(self.metrics.mail_event)
        log.info("stopped")


async def serve(config: Config) -> int:
    app = App(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    loop.add_signal_handler(signal.SIGUSR1, app.reload_queue)
    loop.add_signal_handler(signal.SIGHUP, app.hangup)
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
