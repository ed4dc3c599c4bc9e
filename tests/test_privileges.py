"""``server.user``: bound as root, then never root again (issue 11, acceptance 4).

A real ``monomail serve`` started as root on a privileged port with ``server.user`` set
to a throwaway account: after start-up no thread of the process runs with uid or gid 0
(``/proc/PID/task/*/status``), it still delivers to a TOML user's Maildir, and what it
writes is the account's. Needs root (skips otherwise).
"""

from __future__ import annotations

import contextlib
import mailbox
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import ROOT, base_config, cli, privileged_ports


def _setup(unix_account: Any) -> tuple[Any, Path, int]:
    user = unix_account()
    folder = Path(user.pw_dir) / "srv"  # not under tmp_path: root's 0700 folder
    folder.mkdir(mode=0o755)
    port = privileged_ports(1)[0]
    cfg = base_config(server={"listen": [f"127.0.0.1:{port}"], "user": user.pw_name})
    (folder / "monomail.toml").write_text(tomli_w.dumps(cfg))
    return user, folder, port


def _start(folder: Path, port: int) -> subprocess.Popen[bytes]:
    log = (folder / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "monomail", "serve", "-c", str(folder / "monomail.toml")],
                            cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, (folder / "server.log").read_text()[-2000:]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            if s.recv(3) == b"220":
                return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start")


def _ids(status: str) -> dict[str, list[int]]:
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {k: [int(x) for x in fields[k].split()] for k in ("Uid", "Gid", "Groups")}


def _children(pid: int) -> list[Path]:
    found = []
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):  # a process that ended while we looked
            if p.name.isdigit() and f"PPid:\t{pid}\n" in (p / "status").read_text(errors="replace"):
                found.append(p)
    return found


def test_bound_as_root_then_no_thread_is_root_and_it_still_delivers(unix_account: Any):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    user, folder, port = _setup(unix_account)
    proc = _start(folder, port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.sendmail("me@remote.test", ["alice@example.test"], b"Subject: dropped\r\n\r\nhi\r\n") == {}
        tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
        assert len(tasks) > 1  # the worker threads that wrote the Maildir are checked too
        for task in tasks:
            ids = _ids((task / "status").read_text())
            assert ids["Uid"] == [user.pw_uid] * 4, (task, ids)  # real, effective, saved, filesystem
            assert ids["Gid"] == [user.pw_gid] * 4, (task, ids)
            assert 0 not in ids["Groups"], (task, ids)
        assert _children(proc.pid) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        # A restart as root finds everything it needs still the account's.
        proc = _start(folder, port)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.sendmail("me@remote.test", ["alice@example.test"], b"Subject: again\r\n\r\nhi\r\n") == {}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    box = mailbox.Maildir(folder / "mail/alice", factory=None)
    assert sorted(m["Subject"] for m in box) == ["again", "dropped"]
    made = [folder / "mail", folder / "spool", *(folder / "mail").rglob("*"), *(folder / "spool").rglob("*")]
    assert {p.lstat().st_uid for p in made} == {user.pw_uid}, [p for p in made if p.lstat().st_uid != user.pw_uid]
    log = (folder / "server.log").read_text()
    assert f"running as {user.pw_name} (uid {user.pw_uid}" in log


def test_a_spool_left_by_root_is_refused_with_the_chown_to_run(unix_account: Any):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    user, folder, port = _setup(unix_account)
    (folder / "spool").mkdir(mode=0o700)  # what a run as root left
    out = cli("serve", "-c", str(folder / "monomail.toml"), cwd=folder)
    assert out.returncode == 2, out.stderr
    assert f"server.spool_dir: {folder / 'spool'} is owned by uid 0, not by {user.pw_name}" in out.stderr
    assert f"chown -R {user.pw_name}: {folder / 'spool'}" in out.stderr and "Traceback" not in out.stderr


def test_server_user_that_does_not_exist_is_a_config_error(tmp_path: Path):
    cfg = base_config(server={"user": "mmt-no-such-account"})
    (tmp_path / "monomail.toml").write_text(tomli_w.dumps(cfg))
    out = cli("serve", "-c", str(tmp_path / "monomail.toml"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "config error: server.user: no such account: 'mmt-no-such-account'" in out.stderr
    out = cli("check-config", "-c", str(tmp_path / "monomail.toml"))  # written for another host, maybe
    assert out.returncode == 0, out.stderr
    assert "warning: server.user: no such account: 'mmt-no-such-account' on this host" in out.stderr


def test_server_user_with_system_accounts_is_a_config_error(tmp_path: Path):
    cfg = base_config(server={"user": "nobody"}, local={"system_accounts": True})
    (tmp_path / "monomail.toml").write_text(tomli_w.dumps(cfg))
    out = cli("check-config", "-c", str(tmp_path / "monomail.toml"))
    assert out.returncode == 2 and "server.user: not with local.system_accounts" in out.stderr, out.stderr
