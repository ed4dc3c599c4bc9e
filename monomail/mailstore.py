"""Local mailbox files: Maildir folders and mbox files, written durably.

Job: put one message into one mailbox, all in one call (open, write, fsync, rename or
unlock), so the caller makes exactly one trip to a worker thread per message per
mailbox. Blocking; callers run it off the event loop.

Maildir (https://cr.yp.to/proto/maildir.html): a unique name, written to ``tmp/``,
fsync'd, renamed into ``new/``, and ``new/`` fsync'd so the rename survives a crash. A
crash leaves at most a file in ``tmp/``, which readers never show.

mbox (as /var/spool/mail, mboxrd quoting): a ``From `` line, every ``>*From `` line in
the message quoted with one more ``>``, a blank line after the message. Locking as
Postfix's local(8) and procmail do it: an fcntl lock on the file *and* a ``<mbox>.lock``
dot-lock, both with a bounded wait. Threads of this process are serialised by an
in-process lock first (POSIX fcntl locks do not exclude threads of one process). On
any error the file is truncated back to its old length. Against ``kill -9`` mid-write,
the dot-lock holds the old length (``monomail <size>``): whoever next takes the fcntl
lock and finds such a dot-lock knows its writer died (a live writer would still hold
the fcntl lock) and truncates the half-written tail away (`recover_mbox`).

Messages are stored with LF line endings, as every Unix mail reader expects.
Not here: which mailbox (``router``), the headers to add (``deliver``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import MailboxLocked

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_counter = itertools.count()
_made_dirs: set[Path] = set()
_path_locks: dict[Path, threading.Lock] = {}
_path_locks_guard = threading.Lock()
_PID = os.getpid()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
STALE_FOREIGN_LOCK = 600.0  # seconds: a dot-lock of another program this old is broken


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


class _DirSync:
    """Group commit for one directory: after a rename into it, one fsync of the directory
    covers every rename that finished before that fsync began, so concurrent deliveries
    into one folder share fsyncs instead of queueing one each."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._count = threading.Lock()
        self._sync = threading.Lock()
        self.renamed = 0  # renames finished so far
        self.synced = 0  # renames known durable

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def after_rename(self) -> None:
        with self._count:
            self.renamed += 1
            mine = self.renamed
        with self._sync:
            if self.synced >= mine:
                return
            target = self.renamed
            os.fsync(self.fd)
            self.synced = target


_dir_syncs: dict[str, _DirSync] = {}
_dir_syncs_guard = threading.Lock()
MAX_DIR_FDS = 256


def _dir_sync(path: str) -> _DirSync:
    ds = _dir_syncs.get(path)
    if ds is None:
        with _dir_syncs_guard:
            ds = _dir_syncs.get(path)
            if ds is None:
                if len(_dir_syncs) >= MAX_DIR_FDS:  # keep the fd count bounded; a rare reopen is cheap
                    _dir_syncs.clear()  # fds of dropped entries close when no thread uses them
                ds = _dir_syncs[path] = _DirSync(path)
    return ds


def ensure_maildir(folder: Path) -> None:
    if folder in _made_dirs:
        return
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    _made_dirs.add(folder)


def deliver_maildir(folder: Path, chunks: Sequence[bytes]) -> str:
    """Store the concatenation of ``chunks`` as one new message; returns its file name."""
    ensure_maildir(folder)
    size = sum(len(c) for c in chunks)
    now = time.time()
    name = f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{_PID}Q{next(_counter)}.{_HOST},S={size}"
    base = os.fspath(folder)
    tmp = f"{base}/tmp/{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            _write_all(fd, chunks)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, f"{base}/new/{name}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _dir_sync(f"{base}/new").after_rename()
    return name


def _thread_lock(path: Path) -> threading.Lock:
    with _path_locks_guard:
        lock = _path_locks.get(path)
        if lock is None:
            lock = _path_locks[path] = threading.Lock()
        return lock


def mbox_quote(data: bytes) -> bytes:
    """mboxrd quoting: one more ``>`` in front of every ``>*From `` line."""
    if b"From " not in data:
        return data
    return _FROM_LINE.sub(rb">\1", data)


def from_line(sender: str, when: float) -> bytes:
    who = re.sub(r"\s", "_", sender) or "MAILER-DAEMON"
    return f"From {who} {time.asctime(time.localtime(when))}\n".encode("utf-8", "surrogateescape")


@contextmanager
def locked_mbox(path: Path, timeout: float) -> Iterator[int]:
    """Open ``path`` for appending with the thread, fcntl and dot-lock held.

    Yields the fd; on entry any half-written tail left by a dead monomail writer has
    been truncated away. The dot-lock records the file's length for the next one.
    """
    deadline = time.monotonic() + timeout
    thread_lock = _thread_lock(path)
    if not thread_lock.acquire(timeout=max(timeout, 0.001)):
        raise MailboxLocked(f"{path}: busy in this process")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        dotlock = path.with_name(path.name + ".lock")
        delay = 0.005
        while True:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            else:
                if _take_dotlock(fd, dotlock):
                    try:
                        yield fd
                    finally:
                        with contextlib.suppress(OSError):
                            os.unlink(dotlock)
                        os.close(fd)  # releases the fcntl lock
                    return
                os.close(fd)
            if time.monotonic() >= deadline:
                raise MailboxLocked(f"{path}: locked by another program")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
    finally:
        thread_lock.release()


def write_dotlock(dotlock: Path, size: int) -> None:
    """Record in our dot-lock the mbox length a writer started from (held locks only)."""
    fd = os.open(dotlock, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, b"monomail %d\n" % size)
    finally:
        os.close(fd)


def _take_dotlock(fd: int, dotlock: Path) -> bool:
    """With the fcntl lock held: create the dot-lock, or recover a dead writer's."""
    try:
        lfd = os.open(dotlock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        try:
            content = dotlock.read_bytes()
            age = time.time() - dotlock.stat().st_mtime
        except FileNotFoundError:
            return False  # gone meanwhile: try again
        m = re.fullmatch(rb"monomail (\d+)\n", content)
        if m:
            # Ours, and we hold the fcntl lock, so its writer is dead: undo its tail.
            old = int(m.group(1))
            if os.fstat(fd).st_size > old:
                os.ftruncate(fd, old)
                os.fsync(fd)
        elif age > STALE_FOREIGN_LOCK:
            with contextlib.suppress(OSError):
                os.unlink(dotlock)
            return False
        else:
            return False
        lfd = os.open(dotlock, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(lfd, b"monomail %d\n" % os.fstat(fd).st_size)
    finally:
        os.close(lfd)
    return True


MboxItem = tuple[str, float, Sequence[bytes]]  # (envelope sender, arrival time, chunks)


def deliver_mbox(path: Path, items: Sequence[MboxItem], lock_timeout: float) -> None:
    """Append messages to the mbox under one lock and one fsync (group commit).

    Each item's chunks are already mboxrd-quoted with LF endings. All or nothing: on
    any error the file is cut back to its old length.
    """
    with locked_mbox(path, lock_timeout) as fd:
        size = os.fstat(fd).st_size
        out: list[bytes] = []
        if size:
            tail = os.pread(fd, 2, size - 2) if size >= 2 else os.pread(fd, 1, 0)
            out.append(b"" if tail.endswith(b"\n\n") else (b"\n" if tail.endswith(b"\n") else b"\n\n"))
        for sender, when, chunks in items:
            out.append(from_line(sender, when))
            out.extend(chunks)
            last = next((c for c in reversed(chunks) if c), b"\n")
            out.append(b"\n" if last.endswith(b"\n") else b"\n\n")
        try:
            _write_all(fd, out)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            os.fsync(fd)
            raise


def recover_mbox(path: Path, lock_timeout: float = 1.0) -> None:
    """Truncate a half-written tail left by a monomail writer that died (start-up)."""
    if path.with_name(path.name + ".lock").exists() and path.exists():
        with locked_mbox(path, lock_timeout):
            pass
