"""The host's own accounts as local users: the passwd database, and their files read safely.

Job: with ``local.system_accounts``, say whether a local part names an account of the
host (`lookup`: the stdlib ``pwd``, so NSS and LDAP accounts count too), and give what
delivering to it needs as one frozen ``settings.Account``: uid, gid, supplementary groups, home,
shell, and the mbox ``<local.mail_spool>/<name>``. An account counts when its uid is at
or above ``local.min_uid``, or it is root (uid 0), whose mail should be aliased.

`read_user_file` reads a user's ``~/.forward`` or ``~/.procmailrc``, whoever reads it,
with ``safeio.read_untrusted`` (no symbolic link, no FIFO, a regular file with one link,
at most `MAX_USER_FILE` bytes) and the rules procmail and Exim add: owned by the user or
root, not writable by group or others. Anything else is `UnsafeFile`, whose text says why (for the log).

`mail_group` is the ``mail`` group's id (Debian: the spool is root:mail 2775 and mboxes
are user:mail 0660), or None where there is none (mboxes are then 0600).

Not here: delivering (``deliver``, ``mailstore``), running anything as the user
(``asuser``), the router's use of it (``tables``).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from .safeio import UnsafeFile, read_untrusted
from .settings import Account, LocalConfig

MAX_USER_FILE = 256 * 1024  # bytes: a .forward or .procmailrc larger than this is refused


def _valid_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name and name.isprintable()


def lookup(name: str, local: LocalConfig) -> Account | None:
    """The account ``name`` if it receives mail here (system accounts on, uid at or above
    ``min_uid`` or root), else None. Blocking only as long as the NSS lookup."""
    if not local.system_accounts or not _valid_name(name):
        return None
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, OSError):
        return None
    if entry.pw_name != name or (entry.pw_uid != 0 and entry.pw_uid < local.min_uid):
        return None
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    home = Path(entry.pw_dir) if entry.pw_dir.startswith("/") and os.path.isdir(entry.pw_dir) else None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, home, entry.pw_shell or "/bin/sh",
                   local.mail_spool / entry.pw_name)


def by_uid(uid: int) -> str | None:
    """The login name of ``uid``, or None when the passwd database has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OSError):
        return None


def mail_group() -> int | None:
    """The ``mail`` group's id, or None on a system without one."""
    try:
        return grp.getgrnam("mail").gr_gid
    except (KeyError, OSError):
        return None


def read_user_file(path: Path, owner: int) -> str | None:
    """The text of a file ``owner`` controls, or None when it does not exist; raises
    `UnsafeFile` when it exists but must not be used (the reason in its text), OSError
    when it cannot be read."""

    def owned(st: os.stat_result) -> None:
        if st.st_uid not in (owner, 0):
            raise UnsafeFile(f"owned by uid {st.st_uid}, not by its user or root")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeFile(f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")

    try:
        _, data = read_untrusted(path, MAX_USER_FILE, owned)
    except FileNotFoundError:
        return None
    except UnsafeFile as exc:
        raise UnsafeFile(f"{path}: {exc}, not used") from None
    return data.decode("utf-8", "surrogateescape")
