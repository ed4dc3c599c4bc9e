"""The drop folder: where any local user leaves a message while the server is down.

Job: both sides of ``<spool_dir>/public/maildrop/`` (mode 1733, the server's user: anyone
may create a file, nobody may list the folder, the sticky bit keeps everyone from
removing or renaming another's file), as Postfix's ``maildrop`` with ``postdrop``.

- `deposit` (``sendmail``, as the user): the envelope and the message into a new file,
  created ``O_EXCL`` under a temporary name starting with ``.``, mode 0600, written,
  fsync'd, made 0444 (the server may run as its own unprivileged user, which must read
  it) and renamed to an unguessable name (128 random bits), so a half-written file is
  never taken. As with Postfix's 0444 maildrop files, what keeps other users out is the
  folder: they cannot list it, so they never learn a name.
- `collect` (the server): every finished file, each opened ``O_NOFOLLOW|O_NONBLOCK`` and
  used only when it is a regular file with one link and at most `limit` bytes. What it
  yields carries the file's OWNER (``st_uid`` of the open file): the caller decides the
  envelope sender from that, never from the file's words. A file that fails a check or
  does not parse is a `Bad` (the caller moves it aside or removes it, with a log line);
  temporary files older than `STALE_TEMP` (a writer that died) are removed.

File format: one line of JSON, ``{"v": 1, "sender": "...", "recipients": [...]}``, then
the message with LF line endings.

Security stance: nothing in a drop file can reach another user's message: each file is
its writer's alone (created ``O_EXCL``, read-only, its name never listed, sticky folder:
nobody else may remove or replace it), and the server trusts only
its owner's uid, read from the open file. A hard link to someone else's file (which
would carry that owner) has two links and is refused; a symbolic link or a FIFO is
refused before it is read.

Blocking; the server calls `collect` in a worker thread. Not here: what the sender is
(``policy``), journalling (``spool``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .envelope import parse_path
from .safeio import UnsafeFile, fsync_dir, read_untrusted, write_all

VERSION = 1
DROP_MODE = 0o444  # finished: the server reads it, whatever user it runs as
TEMP_PREFIX = "."
STALE_TEMP = 3600.0  # seconds: a temporary file this old was left by a writer that died
MAX_RECIPIENTS = 10000


class DropError(Exception):
    """A drop file that cannot be used: why, in a sentence for the log."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """One finished drop file, checked and parsed."""

    path: Path
    owner: int  # st_uid of the open file: who wrote it
    sender: str  # what the file asks for (honoured only for a trusted owner)
    recipients: tuple[str, ...]
    data: bytes  # the message, LF line endings
    mtime: float


@dataclass(frozen=True, slots=True)
class Bad:
    """A drop file that fails a check or does not parse."""

    path: Path
    owner: int | None
    reason: str


def deposit(folder: Path, sender: str, recipients: Sequence[str], data: bytes) -> Path:
    """Leave one message in the drop folder (as the calling user); its final path.
    Raises OSError."""
    head = json.dumps({"v": VERSION, "sender": sender, "recipients": list(recipients)}, ensure_ascii=False)
    name = secrets.token_hex(16)
    temp = folder / f"{TEMP_PREFIX}{name}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, [head.encode("utf-8", "surrogateescape"), b"\n", data])
        os.fsync(fd)
        os.fchmod(fd, DROP_MODE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    os.close(fd)
    final = folder / name
    os.rename(temp, final)
    with contextlib.suppress(OSError):  # a folder we may not open for reading (1733)
        fsync_dir(folder)
    return final


def parse(raw: bytes) -> tuple[str, tuple[str, ...], bytes]:
    """(sender, recipients, message) of a drop file's bytes; `DropError` if it does not parse."""
    head, sep, data = raw.partition(b"\n")
    if not sep:
        raise DropError("no envelope line")
    try:
        envelope = json.loads(head.decode("utf-8", "surrogateescape"))
    except (ValueError, UnicodeError) as exc:
        raise DropError(f"envelope line is not JSON: {exc}") from None
    if not isinstance(envelope, dict) or envelope.get("v") != VERSION:
        raise DropError("not a drop file of this release")
    sender, recipients = envelope.get("sender"), envelope.get("recipients")
    if not isinstance(sender, str) or not isinstance(recipients, list) or not recipients:
        raise DropError("envelope has no sender or no recipients")
    if len(recipients) > MAX_RECIPIENTS or not all(isinstance(r, str) for r in recipients):
        raise DropError("bad recipient list")
    for address in [sender, *recipients]:
        try:
            parsed, params = parse_path(f"<{address}>", smtputf8=True)
        except Exception as exc:
            raise DropError(f"bad address {address[:100]!r}") from exc
        if params or (parsed is None and address != sender) or (parsed is not None and not parsed.domain):
            raise DropError(f"bad address {address[:100]!r}")
    if b"\x00" in data:
        raise DropError("the message contains a NUL byte")
    return sender, tuple(recipients), data


def read_one(path: Path, limit: int) -> Dropped:
    """One drop file, checked (see the module's docstring); `DropError` with the reason.
    OSError (other than a refused link) when it cannot be read now."""
    try:
        st, raw = read_untrusted(path, limit)
    except UnsafeFile as exc:
        raise DropError(str(exc)) from None
    sender, recipients, data = parse(raw)
    return Dropped(path, st.st_uid, sender, recipients, data, st.st_mtime)


def owner_of(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        return os.lstat(path).st_uid
    return None


def collect(folder: Path, limit: int, now: float | None = None) -> Iterator[Dropped | Bad]:
    """Every finished drop file, oldest first; stale temporary files are removed. Raises
    OSError only when the folder cannot be listed."""
    now = time.time() if now is None else now
    names = os.listdir(folder)
    found: list[tuple[float, str]] = []
    for name in names:
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if name.startswith(TEMP_PREFIX):
            if now - st.st_mtime > STALE_TEMP:
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        found.append((st.st_mtime, name))
    for _, name in sorted(found):
        path = folder / name
        try:
            yield read_one(path, limit)
        except FileNotFoundError:
            continue
        except DropError as exc:
            yield Bad(path, owner_of(path), str(exc))
        except OSError as exc:
            yield Bad(path, owner_of(path), f"cannot be read: {exc}")


def set_aside(item: Bad, aside: Path) -> Path | None:
    """Move a bad drop file into ``aside`` (a folder only the server reads, made 0700);
    removed instead when that fails. The new path, or None when removed."""
    with contextlib.suppress(OSError):
        with contextlib.suppress(FileExistsError):
            os.mkdir(aside, 0o700)
        os.chmod(aside, 0o700)
        target = aside / item.path.name
        os.rename(item.path, target)
        return target
    with contextlib.suppress(OSError):
        item.path.unlink()
    return None
