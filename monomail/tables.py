"""Lookup tables that live in files: list members files and users' ``.forward`` files.

Job: read them for the router, and re-read a file only when its modification time or
size changed, so routing stays cheap (one ``stat`` per lookup) while an admin's edit
takes effect with the next message, no reload needed.

Formats: a members file holds one address (or local user/alias name) a line, ``#``
comments and blank lines ignored. A ``.forward`` file (forward(5)) holds addresses
separated by commas or newlines; ``\\user`` (the user's own name) means "keep a copy
in my mailbox"; ``|program`` and ``/file`` entries are ignored (and logged): monomail
delivers only to mailboxes and addresses.

Error handling: a file that cannot be read counts as empty (a members file) or absent
(a ``.forward``), and the cause is logged once per change.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .settings import MailingList, User

log = logging.getLogger("monomail.tables")


class FileTables:
    """The router's ``Tables``, backed by files with an mtime cache."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[tuple[int, int], object]] = {}
        self._lock = threading.Lock()

    def _read(self, path: Path, parse):  # noqa: ANN001, ANN202 - tiny internal helper
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: %s", path, exc)
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(path)
            if hit and hit[0] == stamp:
                return hit[1]
        try:
            value = parse(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            log.warning("%s: %s", path, exc)
            return None
        with self._lock:
            self._cache[path] = (stamp, value)
        return value

    def list_members(self, lst: MailingList) -> tuple[str, ...]:
        if lst.members_file is None:
            return lst.members
        from_file = self._read(lst.members_file, _parse_members) or ()
        return tuple(dict.fromkeys((*lst.members, *from_file)))

    def dot_forward(self, user: User) -> tuple[tuple[str, ...], bool] | None:
        folder = user.path if user.mailbox_format == "maildir" else user.path.parent
        path = folder / ".forward" if user.mailbox_format == "maildir" else folder / f".forward.{user.name}"
        parsed = self._read(path, lambda text: _parse_forward(text, user.name, path))
        return parsed or None


def _parse_members(text: str) -> tuple[str, ...]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and all(c.isprintable() and not c.isspace() for c in line):
            out.append(line)
    return tuple(out)


def _parse_forward(text: str, user: str, path: Path) -> tuple[tuple[str, ...], bool] | None:
    targets: list[str] = []
    keep = False
    for line in text.splitlines():
        for item in _items(line):
            if item.lower() in (f"\\{user}", user):
                keep = True
            elif item.startswith(("|", "/")):
                log.warning("%s: %r not supported (pipes and files), ignored", path, item)
            elif item and not any(c.isspace() for c in item):
                targets.append(item)
            elif item:
                log.warning("%s: %r is not an address, ignored", path, item)
    return (tuple(targets), keep) if targets else None


def _items(line: str) -> list[str]:
    """Comma- or space-separated items of a .forward line; quotes group, ``#`` starts a comment."""
    items, current, quoted = [], [], False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            break
        elif (ch == "," or ch.isspace()) and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [i.strip() for i in items if i.strip()]
