"""Rewriting an mbox in place without ever losing mail: the journalled rewrite.

Job: replace part of a locked mbox file (``monomail mail`` applying deletions and read
marks) so that neither a crash at any instant nor a delivery racing the rewrite loses
a message, and finish a rewrite a crash interrupted (`finish_interrupted_rewrite`,
also run at server start-up). Not here: the locks (``mboxlock``), what the new
content is (the reader decides), parsing messages. Follows mbox(5) (mboxrd) and the
locking of Postfix's local(8). Blocking; callers run it off the event loop.

The API: `open_locked` locks an mbox for rewriting and yields a `LockedMbox` (read
it, `LockedMbox.replace_from` it); `no_interrupts` is the signal guard it holds, for
other writers of a mailbox (the reader's Maildir changes); `read_journal` shows an
interrupted rewrite's journal; `fault` is the crash tests' seam.

The rewrite runs under the very locks monomail's delivery takes (``mboxlock``'s
in-process lock, fcntl lock and ``<mbox>.lock`` dot-lock, via
``mboxlock.locked_mbox``), so no delivery can interleave with it. Under them the
file is read again: the bytes loaded when the session began must still be its prefix,
or the reader stops with a clear message and changes nothing (another reader rewrote
it). Bytes past that prefix are mail that arrived during the session; they are kept
after the rewritten messages. Messages before the first changed one are not rewritten.
If the lock cannot be had within ``local.lock_timeout``, ``q`` says so and the session
goes on (``q`` again, or ``x``). Ctrl-C and Ctrl-Z are ignored while a lock is held.

The file is rewritten in place, not replaced by rename: other mbox programs, and
monomail's own writers, lock the inode they opened, and a writer that opened the old
inode just before a rename would append into a file no longer named (its mail lost);
mutt and mailx rewrite in place for the same reason. In place, a crash midway would
leave a torn file, so the rewrite is journalled, and the dot-lock's ``monomail SIZE``
record (which tells the next monomail writer where a dead writer's tail begins) is
kept honest:

1. The new content of the file from the first changed message on (``REGION``, which
   includes the mail that arrived meanwhile) is written to ``<mbox>.monomail-rewrite``
   (temp file, fsync, rename, fsync folder) with ``start`` (where REGION goes) and
   ``boundary`` = the current size: "mail past ``boundary`` arrived after the crash".
2. Growing (status fields added): the dot-lock's record is set to the new size
   (``mboxlock.write_dotlock``, the one writer of that record), the file is
   extended with newlines to that size, fsync, the journal's boundary moves to the new
   size, then REGION is written and fsync'd.
   Shrinking (deletions): REGION is written and the rest up to the old size filled
   with newlines, fsync; the journal's boundary moves to the new size, then the
   dot-lock, then the file is truncated to the new size, fsync.
3. The journal is removed (fsync folder), then the locks are released.

At every instant, everything between ``boundary`` and where a later delivery appends
is newlines (a monomail writer finding the dead reader's dot-lock truncates back to
the recorded size; a foreign one appends at the end), and the bytes before ``start``
are untouched. So the mailbox is exactly ``file[:start] + REGION + (file[boundary:]
without leading newlines)``, whatever crashed where and whoever delivered since.
Whenever this module opens an mbox and finds a journal, it rebuilds that (itself
journalled, the same way) before anything else; ``finish_interrupted_rewrite`` does
it alone, e.g. at server start-up. Until then the torn file may look wrong to other
programs, but no message is lost: each is either in the file past ``boundary`` or in
the journal. (``q`` in another session that finds the journal refuses to write.)
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import mboxlock
from .errors import RewriteError
from .safeio import TMP_PREFIX, fsync_dir, write_file

DEFAULT_LOCK_TIMEOUT = 10.0
JOURNAL_SUFFIX = ".monomail-rewrite"
_JOURNAL_HEADER = re.compile(rb"monomail-rewrite start=(\d+) boundary=(\d+) length=(\d+)\n")

fault: Callable[[str], None] | None = None
"""Fault-injection seam for the crash tests: called with the name of each step of a
rewrite as it completes ("journal", "dotlock", "padded", "boundary", "written",
"truncated", "done"), e.g. to kill the process there. None in normal use."""


# --------------------------------------------------------------------------- low-level I/O


def _step(name: str) -> None:
    if fault is not None:
        fault(name)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 24), offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Ignore Ctrl-C and Ctrl-Z while a mailbox is locked or being written: the work is
    short, and a stopped reader would hold up deliveries. (A kill is still safe.)"""
    try:
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTSTP)}
    except ValueError:  # not the main thread: signals go elsewhere anyway
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _no_append(fd: int) -> None:
    """Clear O_APPEND on the locked fd (Linux pwrite ignores the offset under O_APPEND).
    Not a second fd: closing any fd of the file would drop this process's fcntl lock."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)


# --------------------------------------------------------------------------- mbox rewrite journal


def journal_path(mbox: Path) -> Path:
    return mbox.with_name(mbox.name + JOURNAL_SUFFIX)


@dataclass(frozen=True, slots=True)
class Journal:
    """An interrupted rewrite: the file is to become ``file[:start] + region`` followed
    by the mail past ``boundary`` (which arrived after the crash)."""

    start: int
    boundary: int
    region: bytes


def _write_journal(mbox: Path, start: int, boundary: int, region: bytes) -> None:
    header = b"monomail-rewrite start=%d boundary=%d length=%d\n" % (start, boundary, len(region))
    write_file(journal_path(mbox), [header, region], mode=0o600)


def read_journal(mbox: Path) -> Journal:
    """The journal of an interrupted rewrite of ``mbox`` (``OSError`` if there is none)."""
    path = journal_path(mbox)
    data = path.read_bytes()
    m = _JOURNAL_HEADER.match(data)
    if not m or len(data) - m.end() != int(m.group(3)):
        raise RewriteError(f"{path}: not a monomail rewrite journal; left as it is, {mbox} not touched")
    return Journal(int(m.group(1)), int(m.group(2)), data[m.end():])


def _remove_stale_temps(mbox: Path) -> None:
    """Remove a journal's temporary file left by a crash mid-write (locks held: only the
    holder writes the journal, so any such file is a dead writer's)."""
    for stale in mbox.parent.glob(f"{TMP_PREFIX}{glob.escape(journal_path(mbox).name)}.*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _set_dotlock(mbox: Path, size: int) -> None:
    """Update the held dot-lock's record (the one format: ``mboxlock.write_dotlock``)."""
    mboxlock.write_dotlock(mboxlock.dotlock_path(mbox), size)


def _join(before: bytes, rebuilt: bytes, tail: bytes) -> bytes:
    """``rebuilt`` followed by later mail ``tail``, separated by exactly one blank line;
    ``before`` is what precedes ``rebuilt`` in the file (its last bytes suffice)."""
    tail = tail.lstrip(b"\n")
    if not tail:
        return rebuilt
    ctx = (before[-2:] + rebuilt)[-2:]
    missing = 0 if not ctx or ctx == b"\n" or ctx.endswith(b"\n\n") else 1 if ctx.endswith(b"\n") else 2
    return rebuilt + b"\n" * missing + tail


def _journaled_rewrite(fd: int, mbox: Path, start: int, region: bytes, size: int) -> None:
    """Make the locked file ``file[:start] + region`` (its size is ``size`` and the held
    dot-lock records ``size``); crash-safe as the module docstring explains."""
    end = start + len(region)
    _write_journal(mbox, start, size, region)
    _step("journal")
    if end > size:
        _set_dotlock(mbox, end)
        _step("dotlock")
        _pwrite_all(fd, b"\n" * (end - size), size)
        os.fsync(fd)
        _step("padded")
        _write_journal(mbox, start, end, region)
        _step("boundary")
        _pwrite_all(fd, region, start)
        os.fsync(fd)
        _step("written")
    else:
        _pwrite_all(fd, region + b"\n" * (size - end), start)
        os.fsync(fd)
        _step("written")
        _write_journal(mbox, start, end, region)
        _step("boundary")
        _set_dotlock(mbox, end)
        _step("dotlock")
        os.ftruncate(fd, end)
        os.fsync(fd)
        _step("truncated")
    os.unlink(journal_path(mbox))
    fsync_dir(mbox.parent)
    _step("done")


def _replace_from(fd: int, mbox: Path, start: int, rebuilt: bytes, keep_from: int) -> None:
    """``file[:start] + rebuilt`` + the mail from ``keep_from`` on, journalled (locks held)."""
    size = os.fstat(fd).st_size
    if not start <= keep_from <= size:
        raise RewriteError(f"{mbox}: cannot rewrite from {start} keeping {keep_from} of {size} bytes")
    later = _pread_all(fd, size - keep_from, keep_from)
    before = _pread_all(fd, min(2, start), start - min(2, start))
    _journaled_rewrite(fd, mbox, start, _join(before, rebuilt, later), size)


def _replay(fd: int, mbox: Path) -> None:
    """Finish an interrupted rewrite (locks held)."""
    journal = read_journal(mbox)
    size = os.fstat(fd).st_size
    if not journal.start <= journal.boundary <= size:
        raise RewriteError(f"{journal_path(mbox)}: does not fit {mbox} ({size} bytes); "
                           "left as it is for inspection")
    _replace_from(fd, mbox, journal.start, journal.region, journal.boundary)


# --------------------------------------------------------------------------- the API


class LockedMbox:
    """An mbox held under every lock monomail's delivery takes, ready to be rewritten.

    ``recovered``: an interrupted rewrite was finished on opening. ``interrupted``: one
    was found and left alone (``open_locked(..., finish_interrupted=False)``); then
    `replace_from` refuses.
    """

    def __init__(self, path: Path, fd: int, *, recovered: bool, interrupted: bool) -> None:
        self.path = path
        self._fd = fd
        self.recovered = recovered
        self.interrupted = interrupted

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read(self, size: int, offset: int = 0) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer only at the end of the file)."""
        return _pread_all(self._fd, size, offset)

    def replace_from(self, start: int, rebuilt: bytes, keep_from: int) -> None:
        """Make the file ``file[:start] + rebuilt`` followed by its bytes from ``keep_from``
        on (mail that arrived meanwhile; blank lines in front of it are normalised to one).

        Journalled and crash-safe: a crash at any instant loses no message, and the next
        `open_locked` (or `finish_interrupted_rewrite`) completes the rewrite.
        """
        if self.interrupted:
            raise RewriteError(f"{self.path}: an interrupted rewrite must be finished first")
        _replace_from(self._fd, self.path, start, rebuilt, keep_from)


@contextlib.contextmanager
def open_locked(mbox: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT, *,
                finish_interrupted: bool = True) -> Iterator[LockedMbox]:
    """Lock ``mbox`` as delivery does (``mboxlock.locked_mbox``; ``MailboxLocked`` after
    ``lock_timeout``), with Ctrl-C and Ctrl-Z ignored while it is held. An interrupted
    rewrite found there is finished first, or with ``finish_interrupted=False`` only
    reported (``LockedMbox.interrupted``)."""
    with no_interrupts(), mboxlock.locked_mbox(mbox, lock_timeout) as fd:
        _no_append(fd)
        _remove_stale_temps(mbox)
        found = journal_path(mbox).exists()
        if found and finish_interrupted:
            _replay(fd, mbox)
        yield LockedMbox(mbox, fd, recovered=found and finish_interrupted,
                         interrupted=found and not finish_interrupted)


def finish_interrupted_rewrite(mbox: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> bool:
    """If a reader died rewriting ``mbox``, finish its rewrite now; True if there was one."""
    if not journal_path(mbox).exists():
        return False
    with open_locked(mbox, lock_timeout) as box:
        return box.recovered
