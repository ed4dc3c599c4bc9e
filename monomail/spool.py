"""The spool: queued messages as files on disk, written so a crash never loses one.

Job: store, update, list and remove queue entries, and turn them from and into their
typed form (`QueueEntry`, `QueuedRecipient`): JSON exists only inside this module. One
entry is two files in ``spool_dir``, both human-readable, as chasquid keeps them:

- ``<id>.msg``: the message as accepted (LF endings, our Received header on top);
  written once, never changed.
- ``<id>.json``: the envelope and each recipient's state, rewritten whole on every
  change (indented JSON, format 2)::

      {"format": 2, "id": "...", "sender": "alice@example.test", "received_at": 1764339000.0,
       "smtputf8": false, "size": 2048, "hold": false, "warned": false,
       "recipients": [
        {"address": "bob@remote.test", "state": "deferred", "attempts": 2,
         "next_attempt": 1764339600.0,
         "reply": {"code": 451, "status": "4.4.1", "text": "connect to 127.0.0.3:25: connection refused"},
         "cause": "remote 127.0.0.3: ...", "remote_host": "mx1.remote.test",
         "finished": ["remote:bob@remote.test"], "gave_up": false}]}

  ``state`` is the vocabulary of `envelope.Status` (delivered / deferred / failed),
  the words the mail log and ``monomail queue`` use too. ``reply`` is the last reply
  (code, enhanced status, text); ``cause`` the last attempt's cause (``Outcome.detail``,
  for the admin only); ``remote_host`` the host that gave the reply. Records of the
  release before (no ``format``; ``"state": "pending"``; ``"last_error": "450 4.2.0
  ..."`` as one string) are read as well; unknown keys are ignored, so an admin may edit.

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

Blocking; the queue calls it from worker threads. Not here: what the states mean or
when to retry (``queue``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .envelope import Envelope, Status, new_id
from .errors import CorruptEntry, Reply, SpoolBusy, SpoolError
from .safeio import TMP_PREFIX, fsync_dir, make_dirs, write_file

FORMAT = 2
CORRUPT_DIR = "corrupt"
SERVE_LOCK = ".serve.lock"
_STATES = {"pending": Status.TEMPORARY, **{s.value: s for s in Status}}  # "pending": the release before
_LEGACY_REPLY = re.compile(r"([2-5]\d\d)(?: ([245]\.\d{1,3}\.\d{1,3}))?(?: (.*))?\Z", re.DOTALL)


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """One recipient of a queued message and what has happened to it so far."""

    address: str
    state: Status = Status.TEMPORARY  # TEMPORARY: still to be tried ("deferred")
    attempts: int = 0
    next_attempt: float | None = None  # unix time, for a deferred recipient
    reply: Reply | None = None  # the last reply (a remote MTA's or our own)
    cause: str = ""  # the last attempt's cause, for the admin (never sent to clients)
    remote_host: str = ""  # the host that gave ``reply``
    finished: tuple[str, ...] = ()  # destination keys already delivered (skipped on retry)
    gave_up: bool = False  # failed because the message grew too old

    @property
    def deferred(self) -> bool:
        """Still to be tried."""
        return self.state is Status.TEMPORARY


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One queued message: its envelope and its recipients' states."""

    id: str
    sender: str
    received_at: float
    recipients: tuple[QueuedRecipient, ...]
    smtputf8: bool = False
    size: int = 0
    hold: bool = False
    warned: bool = False

    @property
    def envelope(self) -> Envelope:
        return Envelope(self.id, self.sender, tuple(r.address for r in self.recipients), self.received_at,
                        self.smtputf8, self.size)

    @property
    def deferred(self) -> tuple[QueuedRecipient, ...]:
        """The recipients still to be tried."""
        return tuple(r for r in self.recipients if r.deferred)

    def due(self) -> float | None:
        """When the entry next needs work, or None (held, or nothing deferred)."""
        if self.hold:
            return None
        times = [r.next_attempt or 0.0 for r in self.deferred]
        return min(times) if times else None

    def updated(self, changed: Mapping[str, QueuedRecipient]) -> QueueEntry:
        """This entry with the recipients in ``changed`` (by address) replaced."""
        return replace(self, recipients=tuple(changed.get(r.address, r) for r in self.recipients))


@dataclass(frozen=True, slots=True)
class DamagedEntry:
    """An entry moved aside into ``corrupt/``, and why."""

    name: str
    reason: str
    folder: Path


def new_entry(env: Envelope, due: float) -> QueueEntry:
    """A queue entry for ``env`` with every recipient deferred, due at ``due``."""
    return QueueEntry(env.id, env.sender, env.received_at,
                      tuple(QueuedRecipient(r, next_attempt=due) for r in env.recipients),
                      env.smtputf8, env.size)


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


# -- the record as JSON ----------------------------------------------------------------


def encode(entry: QueueEntry) -> bytes:
    """The record of ``entry``, as indented JSON."""
    record = {
        "format": FORMAT,
        "id": entry.id,
        "sender": entry.sender,
        "received_at": entry.received_at,
        "smtputf8": entry.smtputf8,
        "size": entry.size,
        "hold": entry.hold,
        "warned": entry.warned,
        "recipients": [_encode_recipient(r) for r in entry.recipients],
    }
    return json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"


def _encode_recipient(r: QueuedRecipient) -> dict[str, Any]:
    out: dict[str, Any] = {"address": r.address, "state": r.state.value, "attempts": r.attempts}
    if r.next_attempt is not None:
        out["next_attempt"] = r.next_attempt
    if r.reply is not None:
        out["reply"] = {"code": r.reply.code, "status": r.reply.status, "text": r.reply.text}
    out.update(cause=r.cause, remote_host=r.remote_host, finished=list(r.finished), gave_up=r.gave_up)
    return out


def decode(qid: str, raw: bytes) -> QueueEntry:
    """The entry a record holds. Raises `CorruptEntry` for anything that does not parse
    or does not make sense (this format, or the release before's)."""
    try:
        record = json.loads(raw.decode("utf-8", "surrogateescape"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        fmt = record.get("format", 1)
        if fmt not in (1, FORMAT):
            raise ValueError(f"unknown format {fmt!r}")
        if _get(record, "id", str) != qid:
            raise ValueError(f"its id is {record.get('id')!r}")
        recipients = record.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise ValueError("no recipients")
        return QueueEntry(
            id=qid,
            sender=_get(record, "sender", str),
            received_at=float(_get(record, "received_at", (int, float))),
            recipients=tuple(_decode_recipient(r) for r in recipients),
            smtputf8=_get(record, "smtputf8", bool, False),
            size=_get(record, "size", int, 0),
            hold=_get(record, "hold", bool, False),
            warned=_get(record, "warned", bool, False),
        )
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptEntry(qid, f"queue entry {qid} is damaged: {exc}") from None


_MISSING: Any = object()


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = obj.get(key, default)
    if value is _MISSING:
        raise ValueError(f"no {key!r}")
    if value is default and default is not _MISSING:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"{key!r} is {value!r}")
    return value


def _decode_recipient(r: Any) -> QueuedRecipient:
    if not isinstance(r, dict):
        raise ValueError(f"recipient {r!r} is not a JSON object")
    state = _STATES.get(_get(r, "state", str))
    if state is None:
        raise ValueError(f"recipient state {r['state']!r}")
    next_at = r.get("next_attempt")
    if next_at is not None:
        next_at = float(_get(r, "next_attempt", (int, float)))
    finished = _get(r, "finished", list, [])
    if not all(isinstance(f, str) for f in finished):
        raise ValueError(f"'finished' is {finished!r}")
    return QueuedRecipient(
        address=_get(r, "address", str),
        state=state,
        attempts=_get(r, "attempts", int, 0),
        next_attempt=next_at,
        reply=_decode_reply(r),
        cause=_get(r, "cause", str, ""),
        remote_host=_get(r, "remote_host", str, ""),
        finished=tuple(finished),
        gave_up=_get(r, "gave_up", bool, False),
    )


def _decode_reply(r: dict[str, Any]) -> Reply | None:
    reply = r.get("reply")
    if reply is not None:
        if not isinstance(reply, dict):
            raise ValueError(f"'reply' is {reply!r}")
        return Reply(_get(reply, "code", int), _get(reply, "status", str, ""), _get(reply, "text", str, ""))
    legacy = _get(r, "last_error", str, "")  # the release before: "450 4.2.0 Mailbox busy"
    return parse_reply(legacy) if legacy else None


def parse_reply(text: str) -> Reply:
    """A reply written as one line (``450 4.2.0 Mailbox busy``) as a `Reply`; text that is
    not one becomes the text of a ``451 4.0.0``."""
    m = _LEGACY_REPLY.match(text.strip())
    if m is None:
        return Reply(451, "4.0.0", text.strip())
    return Reply(int(m.group(1)), m.group(2) or "", m.group(3) or "")
