"""The spool: queued messages as files on disk, written so a crash never loses one.

Job: store, update, list and remove queue entries. One entry is two files in
``spool_dir``, both human-readable, as chasquid keeps them:

- ``<id>.msg``: the message as accepted (LF endings, our Received header on top);
  written once, never changed.
- ``<id>.json``: the envelope and each recipient's state (pending / delivered /
  failed, attempts, next attempt, last error), rewritten whole on every change.

Every write is safe-write: a temporary name, fsync, rename, fsync of the folder. The
``.msg`` is made durable before the ``.json`` that points to it, so an entry is
visible only when complete; a ``.msg`` without ``.json`` is the leftover of an accept
that never answered 250, and `scan` removes it at start-up. Removal goes the other
way (``.json`` first).

Blocking; the queue calls it from worker threads. Not here: what the states mean or
when to retry (``queue``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .envelope import Envelope, new_id
from .errors import SpoolError

Record = dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp.{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _valid_id(qid: str) -> bool:
    return bool(qid) and qid.isalnum() and qid.isascii()


class Spool:
    """The folder of queue entries."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

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

    def store(self, record: Record, data: bytes) -> None:
        """Journal a new entry durably: message, then record, then the folder."""
        msg, env = self._paths(record["id"])
        try:
            _write_file(msg, data)
            _write_file(env, _encode(record))
            _fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot write queue entry {record['id']}: {exc}") from exc

    def journal_new(self, sender: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool | None = None,
                    now: float | None = None) -> Envelope:
        """The one way to journal a new message (sendmail, deliver, list posts, bounces): a
        fresh queue id, every recipient pending and due ``now``, stored durably before
        return. Raises `SpoolError`."""
        now = time.time() if now is None else now
        if smtputf8 is None:
            smtputf8 = not sender.isascii() or any(not r.isascii() for r in recipients)
        env = Envelope(new_id(now), sender, tuple(recipients), now, smtputf8, len(data))
        self.store(new_record(env, now), data)
        return env

    def update(self, record: Record) -> None:
        _, env = self._paths(record["id"])
        try:
            _write_file(env, _encode(record))
            _fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot update queue entry {record['id']}: {exc}") from exc

    def remove(self, qid: str) -> None:
        msg, env = self._paths(qid)
        try:
            env.unlink(missing_ok=True)
            msg.unlink(missing_ok=True)
            _fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot remove queue entry {qid}: {exc}") from exc

    def load(self, qid: str) -> Record:
        _, env = self._paths(qid)
        try:
            return json.loads(env.read_bytes())
        except FileNotFoundError:
            raise SpoolError(f"no queue entry {qid}") from None
        except (OSError, ValueError) as exc:
            raise SpoolError(f"cannot read queue entry {qid}: {exc}") from exc

    def message(self, qid: str) -> bytes:
        msg, _ = self._paths(qid)
        try:
            return msg.read_bytes()
        except OSError as exc:
            raise SpoolError(f"cannot read message of {qid}: {exc}") from exc

    def message_size(self, qid: str) -> int:
        msg, _ = self._paths(qid)
        try:
            return msg.stat().st_size
        except OSError:
            return 0

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def exists(self, qid: str) -> bool:
        return self._paths(qid)[1].exists()

    def records(self) -> Iterator[Record]:
        """Every readable entry; unreadable ones are skipped (and reported by the caller)."""
        for qid in self.ids():
            try:
                yield self.load(qid)
            except SpoolError:
                continue

    def clean_orphans(self) -> list[str]:
        """At start-up: drop half-made entries and temporary files. Returns what went."""
        gone = []
        try:
            names = set(os.listdir(self.dir))
        except FileNotFoundError:
            return gone
        for name in names:
            orphan = name.endswith(".msg") and name[:-4] + ".json" not in names
            if name.startswith(".tmp.") or orphan:
                (self.dir / name).unlink(missing_ok=True)
                gone.append(name)
        return gone


def _encode(record: Record) -> bytes:
    return json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"


def new_record(env: Envelope, now: float) -> Record:
    """A spool record with every recipient pending, due ``now``."""
    return {
        "id": env.id,
        "sender": env.sender,
        "received_at": env.received_at,
        "smtputf8": env.smtputf8,
        "size": env.size,
        "hold": False,
        "warned": False,
        "recipients": [{"address": r, "state": "pending", "attempts": 0, "next_attempt": now, "finished": []}
                       for r in env.recipients],
    }
