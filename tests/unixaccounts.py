"""Throwaway Unix accounts for tests that need real ones (root only).

`unix_account` is a pytest fixture: ``unix_account()`` creates an account with
``useradd`` (a unique ``mmt`` prefix, its own group, a home directory under a private
0755 folder, shell /bin/sh) and returns its passwd entry; every account it made is
removed with ``userdel`` at teardown, its home and mail spool file with it. Tests that
use it skip cleanly when not run as root or when ``useradd`` is missing.

`as_user` runs a command with the account's rights (``setpriv``: uid, gid and its
groups, its HOME/USER/LOGNAME), as a cron job or a login would.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

PREFIX = "mmt"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (creates throwaway Unix accounts)")
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _run_retrying(argv: list[str]) -> None:
    """useradd/userdel, retried while another process holds the passwd lock."""
    for attempt in range(50):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0:
            return
        if "lock" not in done.stderr.lower() or attempt == 49:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
        time.sleep(0.1)


@pytest.fixture
def unix_account() -> Iterator[Any]:
    need_root()
    homes = Path(tempfile.mkdtemp(prefix="monomail-homes-"))
    homes.chmod(0o755)
    made: list[str] = []

    def create(home: bool = True, groups: Sequence[str] = ()) -> pwd.struct_passwd:
        name = f"{PREFIX}{secrets.token_hex(4)}"
        argv = ["useradd", "--user-group", "--shell", "/bin/sh", "--home-dir", str(homes / name)]
        argv += ["--create-home"] if home else ["--no-create-home"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        _run_retrying([*argv, name])
        made.append(name)
        return pwd.getpwnam(name)

    yield create
    for name in made:
        spool = Path("/var/mail") / name
        _run_retrying(["userdel", "--remove", "--force", name])
        if spool.is_file():  # userdel removes it on Debian; be sure
            spool.unlink()
    shutil.rmtree(homes, ignore_errors=True)


def as_user(entry: pwd.struct_passwd, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` as the account (setpriv: uid, gid, its supplementary groups), in its
    home, with a login's environment; ``kwargs`` go to ``subprocess.run``."""
    env = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name, "SHELL": entry.pw_shell,
           "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", **kwargs.pop("env", {})}
    cwd = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
    cmd = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--", *argv]
    kwargs.setdefault("timeout", 60)
    return subprocess.run(cmd, env=env, cwd=cwd, check=False, **kwargs)
