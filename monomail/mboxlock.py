"""Locking an mbox file, and judging a dot-lock somebody left behind.

Job: `locked_mbox` holds an mbox for one writer: an in-process lock per path (our
threads queue rather than poll), then an fcntl lock on the file *and* a ``<mbox>.lock``
dot-lock, as Postfix's local(8), procmail and mutt lock a mailbox; the wait for them is
bounded (`MailboxLocked` after ``timeout``). The fcntl lock is an open-file-description
lock where Linux has them: other programs see an ordinary fcntl lock, and unlike a
POSIX one it excludes our own threads too and survives the closing of another fd of
the same file in this process. `write_dotlock` updates the
record in a held dot-lock; `recover_mbox` repairs a mailbox after a crash (start-up).
Not here: what is written into the mbox (``mailstore``, ``mboxrewrite``). Blocking;
callers run it off the event loop.

A mailbox with an `Owner` (a system account's ``<mail_spool>/<name>``, written by a
server that runs as root) is opened the careful way: an existing one without following
a symbolic link, and used only when it is a regular file with one link owned by that
uid (else `UnsafeMailbox`, a temporary failure: nothing is ever written to another
file); a new one is created with ``O_EXCL | O_NOFOLLOW`` and given its owner, group and
mode (``fchown``, ``fchmod``: never the umask's) before any byte is written. The folder
is never created for it (the spool is the system's).

The record. Our dot-lock holds ``monomail SIZE``: the mbox length when the writer began.
A monomail writer holds the fcntl lock for as long as its dot-lock exists, so whoever
takes the fcntl lock and finds a ``monomail`` dot-lock knows its writer died, and cuts
the half-written tail back to SIZE.

Taking the dot-lock is one atomic step, so a dot-lock file always has its full content:
the record is written into a file with no name (``O_TMPFILE``), which is then linked to
``<mbox>.lock`` (a link fails if the name exists: the classic NFS-safe dot-lock). Where
``O_TMPFILE`` is not supported, a unique temporary name is linked, then removed. A kill
or a full disk at any instant leaves no dot-lock or a whole one. `write_dotlock` renames
a new file over the held one (the lock never lapses).

Judging a dot-lock that is in place, with the fcntl lock held:

============================  =========================================================
its content                   what is done
============================  =========================================================
``monomail SIZE``, made by    ours, and its writer is dead: cut back to SIZE, take over
our own uid                   (of another uid: foreign, below; in a spool that others
                              may write, e.g. 1777, nobody else's file cuts a mailbox)
a process id (liblockfile,    broken at once if no such process exists here; waited
``dotlockfile -p``, mutt)     for while it does
empty                         no owner recorded (Postfix, Exim and ``mutt_dotlock``
                              write none; an older monomail killed mid-lock left one):
                              broken once `EMPTY_LOCK_GRACE` seconds old. Postfix and
                              procmail take their dot-lock *before* the fcntl lock, so
                              a live one may briefly hold an empty dot-lock while
                              waiting for the fcntl lock we hold at that instant.
anything else (procmail's     another program's, and nothing tells whether it lives:
``0``, a host:pid, ...)       waited for, broken once `STALE_FOREIGN_LOCK` seconds old
                              (Postfix's rule)
============================  =========================================================

A dot-lock is broken only if it is still the file that was judged (same inode). Two
programs that both break a stale lock can still race (every dot-lock scheme can);
fcntl-locking programs cannot, as only the holder of the fcntl lock judges.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import safeio
from .errors import MailboxLocked

STALE_FOREIGN_LOCK = 600.0  # seconds: a dot-lock of another program this old is broken
EMPTY_LOCK_GRACE = 2.0  # seconds: an empty dot-lock this old has no live owner (fcntl lock held)
MAX_POLL = 0.05  # seconds between tries at most: a busy writer's unlocked moments are short
_RECORD = re.compile(rb"monomail (\d+)\n")
_PID = re.compile(rb"\s*(\d{1,10})\s*")
_MAX_LOCK_READ = 256
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EXDEV)

# F_OFD_SETLK (Linux 3.15+) conflicts with POSIX fcntl/lockf locks of other programs, and
# belongs to our fd, not to the process (see the module docstring). Elsewhere: lockf.
_ofd: int = getattr(fcntl, "F_OFD_SETLK", 0)
_WHOLE_FILE_WRITE_LOCK = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # struct flock, pid 0
_path_locks: dict[Path, threading.Lock] = {}
_path_locks_guard = threading.Lock()


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose mbox this is: a new one gets this uid, gid and mode; an existing one must
    belong to ``uid``."""

    uid: int
    gid: int
    mode: int  # 0o660 (group mail) or 0o600


class UnsafeMailbox(OSError):
    """An account's mbox that is not written: a symbolic link, not a regular file, more
    than one link, or another owner (temporary: an admin must look)."""


def dotlock_path(mbox: Path) -> Path:
    return mbox.with_name(mbox.name + ".lock")


def record(size: int) -> bytes:
    """The content of our dot-lock for an mbox that a writer found ``size`` bytes long."""
    return b"monomail %d\n" % size


def _thread_lock(path: Path) -> threading.Lock:
    with _path_locks_guard:
        lock = _path_locks.get(path)
        if lock is None:
            lock = _path_locks[path] = threading.Lock()
        return lock


@contextmanager
def locked_mbox(path: Path, timeout: float, owner: Owner | None = None) -> Iterator[int]:
    """Open ``path`` for appending with the thread, fcntl and dot-lock held.

    Yields the fd; on entry any half-written tail left by a dead monomail writer has
    been cut away, and the dot-lock records the file's length for the next one.
    Raises `MailboxLocked` if the locks cannot be had within ``timeout`` seconds, and
    with an ``owner``, `UnsafeMailbox` for a file that is not that owner's own mbox.
    """
    deadline = time.monotonic() + timeout
    thread_lock = _thread_lock(path)
    if not thread_lock.acquire(timeout=max(timeout, 0.001)):
        raise MailboxLocked(f"{path}: busy in this process")
    try:
        dotlock = dotlock_path(path)
        delay = 0.005
        while True:
            fd = _open_mbox(path) if owner is None else _open_owned(path, owner)
            try:
                why = _try_lock(fd, dotlock)
            except BaseException:
                os.close(fd)
                raise
            if not why:
                try:
                    yield fd
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(dotlock)
                    os.close(fd)  # releases the fcntl lock
                return
            os.close(fd)
            if time.monotonic() >= deadline:
                raise MailboxLocked(f"{path} ({why}): locked by another program")
            time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, MAX_POLL)
    finally:
        thread_lock.release()


def write_dotlock(dotlock: Path, size: int) -> None:
    """Record ``size`` in our held dot-lock: a new file renamed over it, so the lock never
    lapses and never holds half a record (locks held only)."""
    safeio.write_file(dotlock, record(size), mode=0o600)


def recover_mbox(path: Path, lock_timeout: float = 1.0) -> None:
    """Cut away a half-written tail left by a monomail writer that died, and break a
    dot-lock nobody holds (start-up)."""
    if dotlock_path(path).exists() and path.exists():
        with locked_mbox(path, lock_timeout):
            pass


# --------------------------------------------------------------------------- the steps


def _open_mbox(path: Path) -> int:
    """Open the mbox for appending; a new one is made 0600 (its folders 0700), whatever
    the umask. An existing file keeps its mode."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        safeio.make_dirs(path.parent)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_owned(path: Path, owner: Owner) -> int:
    """An account's mbox, opened for appending: see the module docstring."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    for _ in range(3):
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeMailbox(errno.ELOOP, "is a symbolic link, not written", str(path)) from None
            raise
        else:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    why = "is not a regular file"
                elif st.st_nlink != 1:
                    why = f"has {st.st_nlink} links"
                elif st.st_uid != owner.uid:
                    why = f"is owned by uid {st.st_uid}, not by its account (uid {owner.uid})"
                else:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            raise UnsafeMailbox(errno.EPERM, f"{why}, not written", str(path))
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue  # made meanwhile: open it as an existing one
        try:
            os.fchown(fd, owner.uid, owner.gid)
            os.fchmod(fd, owner.mode)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            raise
        return fd
    raise UnsafeMailbox(errno.EAGAIN, "keeps changing, not written", str(path))


def _fcntl_lock(fd: int) -> bool:
    """Try for an exclusive fcntl lock on the whole file; False if someone holds one."""
    global _ofd
    if _ofd:
        try:
            fcntl.fcntl(fd, _ofd, _WHOLE_FILE_WRITE_LOCK)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if exc.errno != errno.EINVAL:
                raise
            _ofd = 0  # a kernel without OFD locks: classic POSIX locks from now on
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # from offset 0 (just opened) to any end
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def _try_lock(fd: int, dotlock: Path) -> str:
    """Take the fcntl lock and the dot-lock: "" when both are held, else why not."""
    if not _fcntl_lock(fd):
        return "fcntl lock held"
    for _ in range(3):  # a lock broken or gone meanwhile is tried again at once
        if _link_new(dotlock, record(os.fstat(fd).st_size)):
            return ""
        why = _judge(fd, dotlock)
        if not why:
            return ""
        if why != "gone":
            return why
    return "dot-lock changing"


def _link_new(dotlock: Path, content: bytes) -> bool:
    """Create ``dotlock`` holding ``content`` in one step; False if it exists."""
    dfd = os.open(dotlock.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            tfd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                raise
            return _link_named(dotlock, content)
        try:
            safeio.write_all(tfd, [content])
            try:
                # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names an O_TMPFILE file
                os.link(f"/proc/self/fd/{tfd}", dotlock.name, dst_dir_fd=dfd, follow_symlinks=True)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE:  # no /proc: do it with a name
                    raise
                return _link_named(dotlock, content)
            return True
        finally:
            os.close(tfd)
    finally:
        os.close(dfd)


def _link_named(dotlock: Path, content: bytes) -> bool:
    """`_link_new` through a unique temporary name (no O_TMPFILE here)."""
    tmp = safeio.temp_name(dotlock)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            safeio.write_all(fd, [content])
        finally:
            os.close(fd)
        try:
            os.link(tmp, dotlock)
        except FileExistsError:
            return False
        except OSError:
            if os.stat(tmp).st_nlink == 2:  # NFS: made, though the reply was lost
                return True
            raise
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _judge(fd: int, dotlock: Path) -> str:
    """With the fcntl lock held, a dot-lock is in place: take it over if its owner is
    provably gone (module docstring). Returns "" when the lock is ours now, "gone" when
    it vanished or was broken (try again), else why it is honoured."""
    try:
        st = os.lstat(dotlock)
        content = _read_small(dotlock, st)
    except FileNotFoundError:
        return "gone"
    age = time.time() - st.st_mtime
    if content is not None and (m := _RECORD.fullmatch(content)) and st.st_uid == os.geteuid():
        _recover(fd, dotlock, int(m.group(1)))
        return ""
    if content == b"":
        if age >= EMPTY_LOCK_GRACE:
            return "gone" if _break(dotlock, st) else "dot-lock changing"
        return f"empty dot-lock, {age:.1f} s old"
    if content is not None and (m := _PID.fullmatch(content)) and int(m.group(1)) > 0:
        pid = int(m.group(1))
        if not _alive(pid):
            return "gone" if _break(dotlock, st) else "dot-lock changing"
        return f"dot-lock of pid {pid}"
    if age > STALE_FOREIGN_LOCK:
        return "gone" if _break(dotlock, st) else "dot-lock changing"
    return f"foreign dot-lock, {age:.0f} s old"


def _read_small(dotlock: Path, st: os.stat_result) -> bytes | None:
    """The dot-lock's content, or None when it cannot be read or is no small regular file."""
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_LOCK_READ:
        return None
    if st.st_size == 0:
        return b""  # mutt_dotlock's are mode 0000: no need to open them
    try:
        lfd = os.open(dotlock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        return None  # unreadable to us (EACCES), or replaced by a symlink: cannot be judged
    try:
        return os.read(lfd, _MAX_LOCK_READ + 1)
    finally:
        os.close(lfd)


def _recover(fd: int, dotlock: Path, old: int) -> None:
    """Our dot-lock, its writer dead: cut its half-written tail away, keep the lock."""
    size = os.fstat(fd).st_size
    if size > old:
        os.ftruncate(fd, old)
        os.fsync(fd)
    elif size < old:
        write_dotlock(dotlock, size)  # shortened by someone else: record what is there


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # EPERM: it exists, as another user
    return True


def _break(dotlock: Path, judged: os.stat_result) -> bool:
    """Remove the dot-lock if it is still the file that was judged."""
    try:
        now = os.lstat(dotlock)
    except FileNotFoundError:
        return True
    if (now.st_dev, now.st_ino) != (judged.st_dev, judged.st_ino):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dotlock)
    return True
