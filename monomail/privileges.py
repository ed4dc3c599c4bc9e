"""Which rights ``monomail serve`` runs with, and giving up root for good.

Job: decide, from ``server.user``, ``local.system_accounts`` and who started us, which
of the two modes applies (`plan`), get the folders ready for the account we become while
still root (`prepare`), and switch to it for good (`drop`): supplementary groups, then
the real, effective and saved gid, then uid, checked afterwards (root cannot be regained).

The modes, as the README's "Running as root" section explains them:

- ``server.user = "monomail"``: root binds the ports (25, 465, 587), then the process
  becomes that account before it reads a byte from a client or touches the spool; every
  mailbox, queue file and the PID file is that account's (Dovecot's ``mail_uid``).
- ``local.system_accounts = true``: the process keeps root, as Exim's daemon does,
  because it writes ``/var/spool/mail/<user>`` as each user; everything it does in a
  user's home runs in a child process with that user's rights (``asuser``).
- Started by an ordinary user: that user's rights, nothing to drop. ``server.user`` may
  name that same user (or be empty).

Started as root with neither set, `plan` refuses (a `ConfigError` naming
``server.user``), as Postfix refuses a root ``mail_owner``: mail written as root is mail
nobody else can read. ``server.user = "root"`` says "keep root" on purpose.

Not here: binding (``server``), the order of start-up (``app``).
"""

from __future__ import annotations

import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .safeio import make_dirs
from .settings import Config

log = logging.getLogger("monomail")

NEED_A_MODE = ("monomail is started as root: set it to the account to run as after binding the ports "
               "(e.g. \"monomail\"), or set local.system_accounts = true to deliver to this host's accounts "
               "(README: Running as root)")


@dataclass(frozen=True, slots=True)
class Drop:
    """The account ``serve`` becomes after binding its ports."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def account(name: str) -> pwd.struct_passwd:
    """``server.user``'s passwd entry, or a `ConfigError` naming the key."""
    try:
        return pwd.getpwnam(name)
    except (KeyError, OSError):
        raise ConfigError("server.user", f"no such account: {name!r}") from None


def check(config: Config) -> str | None:
    """What ``check-config`` can say whoever runs it, on whichever host: a warning when
    ``server.user`` names no account here (``serve`` refuses to start then)."""
    try:
        if config.server.user:
            account(config.server.user)
    except ConfigError as exc:
        return f"{exc} on this host (serve refuses to start without it)"
    return None


def plan(config: Config, euid: int | None = None) -> Drop | None:
    """The account to become, None to stay as we are; `ConfigError` (``server.user``) when
    root was not told which mode to use or ``server.user`` cannot be had."""
    euid = os.geteuid() if euid is None else euid
    name = config.server.user
    if euid != 0:
        if name and account(name).pw_uid != euid:
            raise ConfigError("server.user", f"cannot become {name!r}: monomail was not started as root")
        return None
    if config.local.system_accounts:
        return None  # root writes each account's mailbox (config allows only "" or "root" here)
    if not name:
        raise ConfigError("server.user", NEED_A_MODE)
    entry = account(name)
    if entry.pw_uid == 0:
        log.debug("server.user = %r: monomail keeps root; the mailboxes and the spool are root's", name)
        return None
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    return Drop(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def _own(path: Path, drop: Drop, key: str, mode: int = 0o700) -> None:
    """``path`` exists (made for ``drop`` with ``mode`` if not) and belongs to it, or `ConfigError`."""
    make_dirs(path, mode, owner=(drop.uid, drop.gid))
    st = path.stat()
    if st.st_uid != drop.uid:
        raise ConfigError(key, f"{path} is owned by uid {st.st_uid}, not by {drop.name} (server.user): "
                               f"chown -R {drop.name}: {path}")


def prepare(config: Config, drop: Drop) -> None:
    """As root, before `drop`: the spool, the mail folder and the log file exist and are the
    account's, so it can carry on without root. Folders are made for it; ones that belong
    to somebody else (a run as root before) are a `ConfigError` with the ``chown`` to run:
    monomail never changes the owner of what it did not create."""
    _own(config.server.spool_dir, drop, "server.spool_dir", 0o711)  # users reach <spool>/public
    for entry in os.scandir(config.server.spool_dir):
        st = entry.stat(follow_symlinks=False)
        if st.st_uid != drop.uid:
            raise ConfigError("server.spool_dir", f"{entry.path} is owned by uid {st.st_uid}, not by {drop.name} "
                                                  f"(server.user): chown -R {drop.name}: {config.server.spool_dir}")
    _own(config.local.mail_dir, drop, "local.mail_dir")
    if config.log.file is not None:
        make_dirs(config.log.file.parent, 0o700, owner=(drop.uid, drop.gid))
        if config.log.file.exists() and config.log.file.stat().st_uid != drop.uid:
            os.chown(config.log.file, drop.uid, drop.gid, follow_symlinks=False)  # opened by root just now


def drop_to(drop: Drop) -> None:
    """Become ``drop`` for good (groups, gid, uid: real, effective and saved); raises
    PermissionError, or RuntimeError if root could be had back."""
    os.setgroups(list(drop.groups))
    os.setresgid(drop.gid, drop.gid, drop.gid)
    os.setresuid(drop.uid, drop.uid, drop.uid)
    if os.getresuid() != (drop.uid,) * 3 or os.getresgid() != (drop.gid,) * 3:
        raise RuntimeError(f"could not become {drop.name}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise RuntimeError(f"became {drop.name}, yet root could be had back")
    log.info("running as %s (uid %d, gid %d)", drop.name, drop.uid, drop.gid)
