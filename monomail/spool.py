"""The spool: queued messages as files on disk, written so a crash never loses one.

Job: store, update, list and remove queue entries. One entry is two files in
``spool_dir``, both human-readable, as chasquid keeps them:

- ``<id>.msg``: the message as accepted (LF endings, our Received header on top);
  written once, never changed.
- ``<id>.json``: the entry's record (``record``: `QueueEntry` and its JSON), rewritten
  whole on every change.

Every write is safe-write (``safeio``): a temporary name, fsync, rename, fsync of the
folder. The ``.msg`` is made durable before the ``.json`` that points to it, so an entry
is visible only when complete; a ``.msg`` without ``.json`` is the leftover of an accept
that never answered 250, and `clean_orphans` removes it at start-up. Removal goes the
other way (``.json`` first).

Error handling: a file that cannot be read (EMFILE, EIO, a folder where a file should
be) raises `SpoolError`: it is transient, the entry stays. A record that does not parse
or makes no sense (truncated, garbage, no recipients, no ``.msg``) raises
`CorruptEntry`; `quarantine` moves such an entry aside into ``corrupt/`` with a
``<id>.reason`` file, and `damaged` lists what is there. ``.serve.lock`` is held with an
exclusive ``flock`` by the one ``monomail serve`` that owns the spool (`lock_for_serving`);
``.lock`` serialises read-modify-write of records between the server and the CLI.

Blocking; the queue calls it from worker threads. Not here: the record's format
(``record``), what the states mean or when to retry (``queue``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .envelope import Envelope, new_id
from .errors import CorruptEntry, SpoolBusy, SpoolError
from .record import QueueEntry, decode, encode, new_entry
from .safeio import TMP_PREFIX, fsync_dir, make_dirs, write_file

CORRUPT_DIR = "corrupt"
SERVE_LOCK = ".serve.lock"


@dataclass(frozen=True, slots=True)
class DamagedEntry:
    """An entry moved aside into ``corrupt/``, and why."""

    name: str
    reason: str
    folder: Path


def _valid_id(qid: str) -> bool:
    return bool(qid) and qid.isalnum() and qid.isascii()


class Spool:
    """The folder of queue entries."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def corrupt_dir(self) -> Path:
        return self.dir / CORRUPT_DIR

    def create(self) -> None:
        """Make the folder (and its parents) with mode 0700, whatever the umask. Raises OSError."""
        make_dirs(self.dir, 0o700)

    def _paths(self, qid: str) -> tuple[Path, Path]:
        if not _valid_id(qid):
            raise SpoolError(f"bad queue id {qid!r}")
        return self.dir / f"{qid}.msg", self.dir / f"{qid}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the spool's lock for a read-modify-write of entries (server and CLI alike)."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def lock_for_serving(self) -> int:
        """Take the exclusive, non-blocking serve lock; the fd to keep open for the process's
        life (closing it releases the lock). Raises `SpoolBusy` if another process holds it."""
        try:
            self.create()
            fd = os.open(self.dir / SERVE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot open {self.dir / SERVE_LOCK}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise SpoolBusy(f"another monomail serve{who} is using the spool {self.dir}") from exc
        with contextlib.suppress(OSError):  # who holds it, for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def store(self, entry: QueueEntry, data: bytes) -> None:
        """Journal a new entry durably: message, then record, then the folder."""
        msg, env = self._paths(entry.id)
        try:
            write_file(msg, data, sync_dir=False)
            write_file(env, encode(entry), sync_dir=False)
            fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot write queue entry {entry.id}: {exc}") from exc

    def journal_new(self, sender: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool | None = None,
                    now: float | None = None, qid: str | None = None) -> Envelope:
        """The one way to journal a new message (sendmail, deliver, list posts, recipe
        forwards, bounces): a fresh queue id (or ``qid``), every recipient deferred and due
        ``now``, stored durably before return. Raises `SpoolError`."""
        now = time.time() if now is None else now
        if smtputf8 is None:
            smtputf8 = not sender.isascii() or any(not r.isascii() for r in recipients)
        env = Envelope(qid or new_id(now), sender, tuple(recipients), now, smtputf8, len(data))
        self.store(new_entry(env, now), data)
        return env

    def update(self, entry: QueueEntry) -> None:
        _, env = self._paths(entry.id)
        try:
            write_file(env, encode(entry))
        except OSError as exc:
            raise SpoolError(f"cannot update queue entry {entry.id}: {exc}") from exc

    def remove(self, qid: str) -> None:
        msg, env = self._paths(qid)
        try:
            env.unlink(missing_ok=True)
            msg.unlink(missing_ok=True)
            fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot remove queue entry {qid}: {exc}") from exc

    def load(self, qid: str) -> QueueEntry:
        """The entry. Raises `SpoolError` (missing, or unreadable for now) or `CorruptEntry`."""
        _, env = self._paths(qid)
        try:
            raw = env.read_bytes()
        except FileNotFoundError:
            raise SpoolError(f"no queue entry {qid}") from None
        except OSError as exc:
            raise SpoolError(f"cannot read queue entry {qid}: {exc}") from exc
        return decode(qid, raw)

    def message(self, qid: str) -> bytes:
        """The message. Raises `CorruptEntry` when the record has no message, `SpoolError`
        when it cannot be read now."""
        msg, env = self._paths(qid)
        try:
            return msg.read_bytes()
        except FileNotFoundError:
            if env.exists():
                raise CorruptEntry(qid, f"queue entry {qid} has no message file") from None
            raise SpoolError(f"no queue entry {qid}") from None
        except OSError as exc:
            raise SpoolError(f"cannot read message of {qid}: {exc}") from exc

    def message_size(self, qid: str) -> int:
        msg, _ = self._paths(qid)
        try:
            return msg.stat().st_size
        except OSError:
            return 0

    def _names(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SpoolError(f"cannot list {self.dir}: {exc}") from exc
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def ids(self) -> list[str]:
        """The ids of the entries in the spool (names that cannot be ids left out)."""
        return [n for n in self._names() if _valid_id(n)]

    def exists(self, qid: str) -> bool:
        return self._paths(qid)[1].exists()

    def scan(self) -> Iterator[tuple[str, QueueEntry | SpoolError]]:
        """Every entry by name, as `inspect` finds it. Raises `SpoolError` only for a
        folder that cannot be listed."""
        for name in self._names():
            yield name, self.inspect(name)

    def inspect(self, name: str) -> QueueEntry | SpoolError:
        """The entry named ``name``, or why it cannot be had: `CorruptEntry` for a damaged
        one, `SpoolError` for one that cannot be read now or is gone."""
        if not _valid_id(name):
            if not (self.dir / f"{name}.json").exists():
                return SpoolError(f"no queue entry {name}")
            return CorruptEntry(name, f"{name}.json is not named like a queue entry")
        try:
            entry = self.load(name)
            if not self._paths(name)[0].exists():
                self.load(name)  # removed meanwhile (the record goes first)? then this raises
                raise CorruptEntry(name, f"queue entry {name} has no message file")
        except SpoolError as exc:
            return exc
        return entry

    def quarantine(self, name: str, reason: str) -> Path:
        """Move a damaged entry's files into ``corrupt/`` with a ``<name>.reason``; the
        folder. Raises `SpoolError`."""
        if not name or "/" in name or name.startswith("."):
            raise SpoolError(f"bad entry name {name!r}")
        dest = self.corrupt_dir
        try:
            make_dirs(dest, 0o700)
            write_file(dest / f"{name}.reason", (reason.rstrip("\n") + "\n").encode("utf-8", "replace"))
            for suffix in (".json", ".msg"):  # the record first, as `remove` does
                src = self.dir / f"{name}{suffix}"
                if src.exists() or src.is_symlink():
                    os.replace(src, dest / f"{name}{suffix}")
            fsync_dir(dest)
            fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot move damaged entry {name} aside: {exc}") from exc
        return dest

    def damaged(self) -> list[DamagedEntry]:
        """The entries moved aside into ``corrupt/``."""
        try:
            names = sorted(os.listdir(self.corrupt_dir))
        except OSError:
            return []
        out = []
        for n in names:
            if n.endswith(".reason"):
                try:
                    reason = (self.corrupt_dir / n).read_text("utf-8", "replace").strip()
                except OSError as exc:
                    reason = f"(reason unreadable: {exc})"
                out.append(DamagedEntry(n[: -len(".reason")], reason, self.corrupt_dir))
        return out

    def clean_orphans(self) -> list[str]:
        """At start-up (with the serve lock held): drop half-made entries and temporary
        files. Returns what went."""
        gone: list[str] = []
        try:
            names = set(os.listdir(self.dir))
        except FileNotFoundError:
            return gone
        except OSError as exc:
            raise SpoolError(f"cannot list {self.dir}: {exc}") from exc
        for name in names:
            orphan = name.endswith(".msg") and name[:-4] + ".json" not in names
            if name.startswith(TMP_PREFIX) or orphan:
                with contextlib.suppress(OSError):
                    (self.dir / name).unlink()
                    gone.append(name)
        return gone
