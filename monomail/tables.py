"""Lookup tables that live outside the config: list members files, users' ``.forward``
files, and (``local.system_accounts``) the host's accounts.

Job: read them for the router, and re-read a file only when its modification time or
size changed, so routing stays cheap (one ``stat`` per lookup) while an admin's edit
takes effect with the next message, no reload needed. `FileTables.account` is
``accounts.lookup`` (the passwd database, asked each time: an account added or removed
counts at once).

Formats: a members file holds one address (or local user/alias name) a line, ``#``
comments and blank lines ignored. A ``.forward`` file (forward(5)) is read by the one
address-list lexer (``addrlist``, as ``monomail import`` reads it): addresses separated
by commas or newlines, ``Name <addr>`` and ``addr (comment)`` forms, quotes, ``#``
comments; ``\\user`` or ``user`` (the user's own name) means "keep a copy in my
mailbox". Pipes, files, ``:include:``, special items (``:fail:``...) and anything that
does not parse are left out, and logged: monomail delivers a ``.forward`` only to
mailboxes and addresses.

A system account's ``.forward`` is ``<home>/.forward``, read with
``accounts.read_user_file`` (no symbolic link, a regular file with one link, owned by
the account or root, not writable by group or others): one that is not safe is not
used, and a WARNING naming the path and the reason is logged once per change of it.

Error handling: a file that cannot be read counts as empty (a members file) or absent
(a ``.forward``), and the cause is logged once per change.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from . import accounts
from .addrlist import Address, Backslashed, parse_list
from .settings import Account, LocalConfig, MailingList, User

T = TypeVar("T")

log = logging.getLogger("monomail.tables")


class FileTables:
    """The router's ``Tables``, backed by files with an mtime cache."""

    def __init__(self, local: LocalConfig) -> None:
        self.local = local
        self._cache: dict[Path, tuple[tuple[int, ...], object]] = {}
        self._lock = threading.Lock()

    def _read(self, path: Path, parse: Callable[[str], T]) -> T | None:
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
                return hit[1]  # type: ignore[return-value]  # stored by this same parse
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

    def account(self, name: str) -> Account | None:
        return accounts.lookup(name, self.local)

    def _read_user(self, path: Path, owner: int, parse: Callable[[str], T]) -> T | None:
        """`_read` for a file a user controls: the stamp is the link's own (``lstat``), the
        text comes from ``accounts.read_user_file``; an unsafe file is None, logged once."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: %s", path, exc)
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode, st.st_uid)
        with self._lock:
            hit = self._cache.get(path)
            if hit and hit[0] == stamp:
                return hit[1]  # type: ignore[return-value]  # stored by this same parse
        value: T | None = None
        try:
            text = accounts.read_user_file(path, owner)
            value = None if text is None else parse(text)
        except accounts.UnsafeFile as exc:
            log.warning("%s", exc)
        except OSError as exc:
            log.warning("%s: %s", path, exc)
            return None  # not cached: tried again with the next message
        with self._lock:
            self._cache[path] = (stamp, value)
        return value

    def dot_forward(self, user: User | Account) -> tuple[tuple[str, ...], bool] | None:
        if isinstance(user, Account):
            if user.home is None:
                return None
            where = user.home / ".forward"
            return self._read_user(where, user.uid, lambda text: _parse_forward(text, user.name, where)) or None
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
    """(targets, keep a copy) of a .forward file, or None if it forwards nowhere."""
    targets: list[str] = []
    keep = False
    for item in parse_list(text):
        value = item.value
        name = value.name if isinstance(value, Backslashed) else value.value if isinstance(value, Address) else None
        if name is not None and name.lower() == user:
            keep = True
        elif name and all(c.isprintable() and not c.isspace() for c in name):
            targets.append(name)
        else:
            log.warning("%s:%d: %r is not an address monomail forwards to (only mailboxes and addresses), "
                        "ignored", path, item.line, item.raw)
    return (tuple(targets), keep) if targets else None
