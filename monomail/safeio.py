"""Safe writes: a file is either its old self or its new self, never half of each.

Job: the one helper every durable write goes through (spool entries, mbox rewrites,
journals, PID files), as chasquid's ``internal/safeio``: write to a temporary name in
the same folder, fsync it, rename it over the target, fsync the folder so the rename
itself survives a crash. The mode is set explicitly (``fchmod``), never left to the
umask. `fsync_dir` is the folder half on its own, for callers that rename themselves
(Maildir delivery).

And the reading side of the same care: `read_untrusted`, the one way to read a file
somebody else controls (``~/.forward`` and ``~/.procmailrc`` through ``accounts``, drop
files through ``maildrop``) without following a link, blocking on a FIFO or reading
without end; `UnsafeFile` says why one is not used.

Blocking: callers run it off the event loop. Errors are ``OSError``, raised after the
temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

TMP_PREFIX = ".tmp."  # readers of a folder skip names that start with this
Chunk = bytes | bytearray | memoryview


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a folder (renames, creations, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, chunks: Sequence[Chunk]) -> None:
    """Write every byte of ``chunks`` (``writev``, resuming after short writes)."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def temp_name(path: Path) -> Path:
    """A temporary name next to ``path``, unique to this process and thread."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}")


def write_file(path: Path, data: Chunk | Sequence[Chunk], *, mode: int = 0o600, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp, fsync, rename, fsync dir).

    ``sync_dir=False`` leaves the folder's fsync to the caller (one for several files).
    """
    chunks: list[Chunk] = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, chunks)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def make_dirs(path: Path, mode: int = 0o700, owner: tuple[int, int] | None = None) -> None:
    """``mkdir -p`` with ``mode`` on every folder it creates, whatever the umask (and, with
    ``owner``, that uid and gid: root making folders for the account it will become);
    folders that exist keep their mode and owner. Raises ``NotADirectoryError`` if
    something that is not a folder is in the way."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            if not folder.is_dir():  # a file, or a link to nowhere
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder)) from None
            continue  # made meanwhile by someone else
        os.chmod(folder, mode)  # mkdir's mode was masked by the umask
        if owner is not None:
            os.chown(folder, *owner, follow_symlinks=False)


class UnsafeFile(Exception):
    """A file somebody else controls that must not be used: why, for the log."""


def read_untrusted(path: Path, limit: int,
                   check: Callable[[os.stat_result], None] | None = None) -> tuple[os.stat_result, bytes]:
    """The bytes of a file a user controls (``~/.forward``, a drop file): opened without
    following a symbolic link or blocking on a FIFO, used only when it is a regular file
    with one link (a hard link would lend it another owner) of at most ``limit`` bytes,
    and what ``check`` (the caller's rules on the `os.stat_result`) accepts; its status
    and bytes. Raises
    `UnsafeFile` with the reason, OSError (FileNotFoundError included) when it cannot be
    read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeFile("a symbolic link") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile("not a regular file")
        if st.st_nlink != 1:
            raise UnsafeFile(f"{st.st_nlink} hard links")
        if check is not None:
            check(st)
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, 1 << 20)):
            size += len(chunk)
            chunks.append(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise UnsafeFile(f"larger than {limit} bytes")
    return st, b"".join(chunks)
