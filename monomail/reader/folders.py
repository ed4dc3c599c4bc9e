"""The two mailbox formats as ``monomail mail`` sees them: load, then commit decisions.

Job: read every message of one mailbox into `Message` values, and on ``q`` write the
session's decisions (deletions, read marks) back without losing mail that the server
delivered meanwhile. `open_folder` picks the format. Not here: the locks and the
journalled in-place rewrite (``mailstore``, ``mboxrewrite``), delivering (``save``
goes through ``mailstore``), showing messages (``messages``).

mbox (mbox(5), mboxrd): messages start at ``From `` lines; ``>From `` quoting is undone
for display. A message without ``Status:`` (or without ``O``/``R`` in it) is new, ``R``
is read; a message read in this session gets ``Status: RO`` (other letters kept), as
the last field of its header section (RFC 5322 §2.1, ``message.split_header``). The
rewrite runs under the locks delivery takes and changes nothing if the file no longer
starts with the bytes loaded (`MailboxChanged`); see ``mboxrewrite``.

Maildir (https://cr.yp.to/proto/maildir.html): ``new/`` is new; ``S`` in the info
(``name:2,FLAGS``) is read. On commit a message read in this session moves to ``cur/``
as ``name:2,FLAGS`` with ``S`` added (flags kept, ASCII order); a deleted one is
unlinked; messages not touched stay where they are. A file renamed meanwhile by another
client (a flag change) is found again by its unique part; one that vanished is
reported (``warnings``) and skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Sequence
from email import policy
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path

from ..errors import MailboxChanged, ReaderError
from ..mboxrewrite import DEFAULT_LOCK_TIMEOUT, no_interrupts, open_locked
from ..message import split_header
from ..safeio import fsync_dir
from .messages import Message

MBOX_FROM = re.compile(rb"^From ", re.MULTILINE)
_UNQUOTE = re.compile(rb"^>(>*From )", re.MULTILINE)
_STATUS = re.compile(rb"^Status:[ \t]*([^\n]*)\n", re.MULTILINE | re.IGNORECASE)
_MAILDIR_TIME = re.compile(r"(\d+)(?:\.M(\d+))?")


def held(path: Path, count: int, deleted: int, arrived: int) -> str:
    """What ``q`` says: ``Held 3 messages in PATH, deleted 1 (1 arrived while you read)``."""
    text = f"Held {count} message{'s' * (count != 1)} in {path}"
    if deleted:
        text += f", deleted {deleted}"
    if arrived:
        text += f" ({arrived} arrived while you read)"
    return text


# --------------------------------------------------------------------------- mbox


def _parse_from_line(line: bytes) -> tuple[str, float | None]:
    rest = line[5:].decode("utf-8", "replace").strip()
    sender, _, date = rest.partition(" ")
    try:
        when: float | None = time.mktime(time.strptime(" ".join(date.split()[:5]), "%a %b %d %H:%M:%S %Y"))
    except (ValueError, OverflowError):
        when = None
    return ("" if sender == "MAILER-DAEMON" else sender), when


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def _date_of(raw: bytes) -> float | None:
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
    with contextlib.suppress(Exception):
        return parsedate_to_datetime(str(headers.get("Date", ""))).timestamp()
    return None


def _header_end(quoted: bytes) -> int:
    """Offset just past the header section's last field (where a new field would go)."""
    return len(split_header(quoted)[0])


def with_status(quoted: bytes, add: str) -> bytes:
    """``quoted`` (one message, mboxrd-quoted) with ``add`` first in its ``Status:`` field."""
    head_end = _header_end(quoted)
    m = _STATUS.search(quoted, 0, head_end)
    if m is None:
        lf = b"\n" if head_end and not quoted[:head_end].endswith(b"\n") else b""  # a last field without LF
        return quoted[:head_end] + lf + b"Status: " + add.encode() + b"\n" + quoted[head_end:]
    old = m.group(1).decode("ascii", "replace").strip()
    letters = add + "".join(c for c in old if c not in add)
    return quoted[: m.start()] + b"Status: " + letters.encode() + b"\n" + quoted[m.end():]


def parse_mbox(data: bytes) -> list[Message]:
    starts = [m.start() for m in MBOX_FROM.finditer(data)]
    messages = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        region = data[start:end]
        nl = region.find(b"\n")
        from_line = region if nl < 0 else region[: nl + 1]
        body = region[len(from_line):]
        quoted = body[:-1] if body.endswith(b"\n\n") else body
        m = _STATUS.search(quoted, 0, _header_end(quoted))
        flags = m.group(1).decode("ascii", "replace").strip() if m else ""
        raw = _UNQUOTE.sub(rb"\1", quoted)
        sender, when = _parse_from_line(from_line)
        messages.append(Message(
            raw=raw, envelope_sender=sender, received=_first(when, _date_of(raw), time.time()), flags=flags,
            new="O" not in flags and "R" not in flags, seen="R" in flags,
            start=start, end=end, from_line=from_line, quoted=quoted, sep=body[len(quoted):],
        ))
    return messages


class MboxFolder:
    kind = "mbox"

    def __init__(self, path: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self.data = b""
        self.recovered = False  # an interrupted rewrite was finished by load()
        self.warnings: list[str] = []

    def load(self) -> list[Message]:
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise ReaderError(f"{self.path}: neither a file nor a Maildir folder (cur/, new/, tmp/)")
        with open_locked(self.path, self.lock_timeout) as box:
            self.recovered = box.recovered
            self.data = box.read(box.size())
        return parse_mbox(self.data)

    def commit(self, messages: Sequence[Message]) -> str:
        deleted = [m for m in messages if m.deleted]
        marked = [m for m in messages if not m.deleted and m.read_now and "R" not in m.flags]
        kept = len(messages) - len(deleted)
        if not deleted and not marked:
            return held(self.path, kept, 0, 0)
        with open_locked(self.path, self.lock_timeout, finish_interrupted=False) as box:
            size = box.size()
            loaded = len(self.data)
            if size < loaded or box.read(loaded) != self.data:
                raise MailboxChanged(f"{self.path} was changed by another program while you read it; "
                                     "nothing was written (deletions and read marks not applied)")
            if box.interrupted:
                raise MailboxChanged(f"{self.path}: another reader's rewrite was interrupted; nothing was "
                                     "written (run monomail mail again to finish it)")
            first = min(m.start for m in (*deleted, *marked))
            mark = {id(m) for m in marked}
            pieces = []
            for m in messages:
                if m.start < first or m.deleted:
                    continue
                if id(m) in mark:
                    pieces.append(m.from_line + with_status(m.quoted, "RO") + m.sep)
                else:
                    pieces.append(self.data[m.start:m.end])
            arrived = len(MBOX_FROM.findall(box.read(size - loaded, loaded)))
            box.replace_from(first, b"".join(pieces), keep_from=loaded)
        return held(self.path, kept + arrived, len(deleted), arrived)


# --------------------------------------------------------------------------- Maildir


def _maildir_key(name: str, path: Path) -> tuple[int, int, str]:
    m = _MAILDIR_TIME.match(name)
    if m:
        return int(m.group(1)), int(m.group(2) or 0), name
    try:
        return int(path.stat().st_mtime), 0, name
    except OSError:
        return 0, 0, name


class MaildirFolder:
    kind = "maildir"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []

    def load(self) -> list[Message]:
        if not self.path.exists():
            return []
        found: list[tuple[tuple[int, int, str], Message]] = []
        for sub in ("new", "cur"):
            for name in os.listdir(self.path / sub):
                if name.startswith("."):
                    continue
                file = self.path / sub / name
                try:
                    raw = file.read_bytes()
                except (FileNotFoundError, IsADirectoryError):
                    continue  # moved by another client this instant, or not a message
                info = name.partition(":")[2]
                flags = info[2:] if info.startswith("2,") else ""
                sender = ""
                rp = BytesHeaderParser(policy=policy.compat32).parsebytes(raw).get("Return-Path")
                if rp is not None:
                    sender = str(rp).strip().strip("<>").strip()
                key = _maildir_key(name, file)
                found.append((key, Message(raw=raw, envelope_sender=sender, received=float(key[0]) or time.time(),
                                           flags=flags, new=sub == "new", seen="S" in flags,
                                           subdir=sub, name=name)))
        found.sort(key=lambda pair: pair[0])
        return [m for _, m in found]

    def _locate(self, m: Message) -> Path | None:
        path = self.path / m.subdir / m.name
        if path.exists():
            return path
        unique = m.name.partition(":")[0]
        for sub in ("cur", "new"):
            with contextlib.suppress(OSError):
                for name in os.listdir(self.path / sub):
                    if name.partition(":")[0] == unique:
                        return self.path / sub / name
        return None

    def commit(self, messages: Sequence[Message]) -> str:
        with no_interrupts():
            return self._commit(messages)

    def _commit(self, messages: Sequence[Message]) -> str:
        deleted = 0
        for number, m in enumerate(messages, 1):
            if not m.deleted and not (m.read_now and "S" not in m.flags):
                continue
            for _attempt in range(3):  # another client may rename it between look and act
                path = self._locate(m)
                if path is None:
                    self.warnings.append(f"message {number} was removed by another program; left as it is")
                    break
                try:
                    if m.deleted:
                        path.unlink()
                        deleted += 1
                    else:
                        unique, _, info = path.name.partition(":")
                        flags = info[2:] if info.startswith("2,") else ""
                        os.rename(path, self.path / "cur" / f"{unique}:2,{''.join(sorted(set(flags + 'S')))}")
                    break
                except FileNotFoundError:
                    continue
        for sub in ("new", "cur"):
            with contextlib.suppress(OSError):
                fsync_dir(self.path / sub)
        known = {m.name.partition(":")[0] for m in messages}
        arrived = 0
        for sub in ("new", "cur"):
            with contextlib.suppress(OSError):
                arrived += sum(1 for n in os.listdir(self.path / sub)
                               if not n.startswith(".") and n.partition(":")[0] not in known)
        return held(self.path, len(messages) - deleted + arrived, deleted, arrived)


Folder = MboxFolder | MaildirFolder


def open_folder(path: Path, fmt: str | None = None, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Folder:
    """``fmt`` ``"maildir"``/``"mbox"``, or None: a folder with cur/, new/, tmp/ is a Maildir."""
    if fmt is None:
        fmt = "maildir" if path.is_dir() and all((path / s).is_dir() for s in ("cur", "new", "tmp")) else "mbox"
    return MaildirFolder(path) if fmt == "maildir" else MboxFolder(path, lock_timeout)
