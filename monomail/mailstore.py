"""Local mailbox files: Maildir folders and mbox files, written durably.

Job: put one message into one mailbox, all in one call (open, write, fsync, rename or
unlock), so the caller makes exactly one trip to a worker thread per message per
mailbox; and clear out what a killed Maildir writer left (`clean_maildir_tmp`).
Blocking; callers run it off the event loop.

Maildir (https://cr.yp.to/proto/maildir.html): a unique name, written to ``tmp/``,
fsync'd, renamed into ``new/``, and ``new/`` fsync'd so the rename survives a crash. A
crash leaves at most a file in ``tmp/``, which readers never show and which
`clean_maildir_tmp` removes once it is 36 hours old, as the Maildir spec says.

mbox (as /var/spool/mail, mboxrd quoting): a ``From `` line, every ``>*From `` line in
the message quoted with one more ``>``, a blank line after the message, written under
``mboxlock``'s locks (fcntl and dot-lock; a dead writer's half-written tail is cut away
when the locks are taken). On any error the file is cut back to its old length.

Permissions never depend on the umask: folders this module creates are 0700, files 0600
(``safeio.make_dirs``, ``fchmod``); existing ones keep theirs. A system account's spool
mbox is written with an ``Owner`` (``mboxlock``: its uid, the ``mail`` group, 0660, set
before any data; an existing one used only if it is the account's own regular file).

Messages are stored with LF line endings, as every Unix mail reader expects.
Not here: which mailbox (``router``), the headers to add (``deliver``), the locking
itself (``mboxlock``; `recover_mbox` and `MailboxLocked` are re-exported here for the
server's start-up and delivery).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import safeio
from .errors import MailboxLocked
from .mboxlock import Owner, UnsafeMailbox, locked_mbox, recover_mbox

__all__ = [
    "MAILDIR_TMP_MAX_AGE",
    "MailboxLocked",
    "MboxItem",
    "Owner",
    "UnsafeMailbox",
    "clean_maildir_tmp",
    "deliver_maildir",
    "deliver_mbox",
    "ensure_maildir",
    "from_line",
    "mbox_quote",
    "recover_mbox",
]

MAILDIR_TMP_MAX_AGE = 36 * 3600.0  # seconds: the Maildir spec's age for abandoned tmp/ files
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_counter = itertools.count()
_made_dirs: set[Path] = set()
_pid = os.getpid()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()
    _made_dirs.clear()


os.register_at_fork(after_in_child=_after_fork)


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
    """Make ``folder`` a Maildir (``tmp``, ``new``, ``cur``); what it creates is 0700."""
    if folder in _made_dirs:
        return
    for sub in ("tmp", "new", "cur"):
        safeio.make_dirs(folder / sub)
    _made_dirs.add(folder)


def deliver_maildir(folder: Path, chunks: Sequence[bytes]) -> str:
    """Store the concatenation of ``chunks`` as one new message; returns its file name."""
    ensure_maildir(folder)
    size = sum(len(c) for c in chunks)
    now = time.time()
    name = f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{_pid}Q{next(_counter)}.{_HOST},S={size}"
    base = os.fspath(folder)
    tmp = f"{base}/tmp/{name}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:  # removed since it was made: make it again
        _made_dirs.discard(folder)
        ensure_maildir(folder)
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away
            safeio.write_all(fd, chunks)
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


def clean_maildir_tmp(folder: Path, older_than: float = MAILDIR_TMP_MAX_AGE) -> int:
    """Remove files in ``folder/tmp`` not accessed or modified for ``older_than`` seconds
    (what a killed writer left); returns how many were removed.

    Never follows a symbolic link (``folder`` or ``tmp`` being one, or an entry in
    ``tmp``: left alone) and removes only regular files. A missing folder is no error.
    """
    cutoff = time.time() - older_than
    nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        top = os.open(folder, nofollow)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return 0
        raise
    try:
        try:
            tmp = os.open("tmp", nofollow, dir_fd=top)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return 0
            raise
    finally:
        os.close(top)
    removed = 0
    try:
        with os.scandir(tmp) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or max(st.st_atime, st.st_mtime) >= cutoff:
                        continue
                    os.unlink(entry.name, dir_fd=tmp)
                except FileNotFoundError:
                    continue
                removed += 1
    finally:
        os.close(tmp)
    return removed


def mbox_quote(data: bytes) -> bytes:
    """mboxrd quoting: one more ``>`` in front of every ``>*From `` line."""
    if b"From " not in data:
        return data
    return _FROM_LINE.sub(rb">\1", data)


def from_line(sender: str, when: float) -> bytes:
    who = re.sub(r"\s", "_", sender) or "MAILER-DAEMON"
    return f"From {who} {time.asctime(time.localtime(when))}\n".encode("utf-8", "surrogateescape")


MboxItem = tuple[str, float, Sequence[bytes]]  # (envelope sender, arrival time, chunks)


def deliver_mbox(path: Path, items: Sequence[MboxItem], lock_timeout: float, owner: Owner | None = None) -> None:
    """Append messages to the mbox under one lock and one fsync (group commit).

    Each item's chunks are already mboxrd-quoted with LF endings. All or nothing: on
    any error the file is cut back to its old length. ``owner``: an account's spool mbox
    (see ``mboxlock.Owner``).
    """
    with locked_mbox(path, lock_timeout, owner) as fd:
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
            safeio.write_all(fd, out)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            os.fsync(fd)
            raise
