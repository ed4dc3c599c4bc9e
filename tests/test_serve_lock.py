"""One spool, one server: a second ``monomail serve`` on the same spool refuses to start,
with one line, and leaves the first one (and its PID file) alone. Real subprocesses."""

from __future__ import annotations

import mailbox
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, ProcessServer, free_port, write_config


def second_serve(tmp_path: Path, port: int) -> subprocess.CompletedProcess[str]:
    """``monomail serve`` with the same spool as the running one, on another port."""
    cfg = tmp_path / "second" / "monomail.toml"
    cfg.parent.mkdir(exist_ok=True)
    first = (tmp_path / "monomail.toml").read_text()
    cfg.write_text(first.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
                   .replace('spool_dir = "spool"', f'spool_dir = "{tmp_path / "spool"}"'))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "monomail", "serve", "-c", str(cfg)], capture_output=True,
                          text=True, timeout=30, cwd=cfg.parent, env=env)


def test_second_server_on_one_spool_refuses_to_start(process_server, tmp_path: Path):
    first = process_server()
    pid_file = tmp_path / "spool" / "public" / "monomail.pid"
    assert pid_file.read_text().splitlines()[0] == str(first.proc.pid)

    started = time.monotonic()
    second = second_serve(tmp_path, first.port)
    assert time.monotonic() - started < 10  # it does not wait for the lock
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"another monomail serve (pid {first.proc.pid})" in lines[0] and str(tmp_path / "spool") in lines[0]
    assert second.stdout == ""

    # The first is untouched: its PID file, and it still serves and delivers.
    assert pid_file.read_text().splitlines()[0] == str(first.proc.pid)
    assert first.proc.poll() is None
    with smtplib.SMTP("127.0.0.1", first.port, timeout=10) as s:
        assert s.sendmail("me@remote.test", ["alice@example.test"], b"Subject: still here\r\n\r\nx\r\n") == {}
    assert [m["Subject"] for m in mailbox.Maildir(tmp_path / "mail" / "alice", factory=None)] == ["still here"]
    assert first.terminate() == 0
    assert not pid_file.exists()

    # Once the first has stopped, the spool is free again.
    again = ProcessServer(tmp_path / "monomail.toml", first.port).start()
    try:
        assert pid_file.read_text().splitlines()[0] == str(again.proc.pid)
    finally:
        assert again.terminate() == 0


def test_queued_mail_is_delivered_once_with_two_servers_started(tmp_path: Path):
    """The trial's case: mail waiting in the spool, two servers started on it. Only one
    runs, so each queued message reaches its mailbox once."""
    port = free_port()
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{port}"], "spool_dir": "spool"},
                          queue={"retry": ["1h"]})
    # Ten messages for bob wait in the spool (no server yet: `monomail sendmail` journals them).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONOMAIL_CONFIG": str(config)}
    for n in range(10):
        out = subprocess.run([sys.executable, "-m", "monomail", "sendmail", "-oi", "bob@example.test"],
                             input=f"Subject: queued {n}\n\nx\n", text=True,
                             capture_output=True, timeout=30, env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "spool").glob("*.json"))) == 10
    first = ProcessServer(config, port).start()
    try:
        second = second_serve(tmp_path, port)
        assert second.returncode == 1
        deadline = time.monotonic() + 20
        while list((tmp_path / "spool").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        assert first.terminate() == 0
    subjects = sorted(m["Subject"] for m in mailbox.mbox(tmp_path / "mail" / "bob"))
    assert subjects == sorted(f"queued {n}" for n in range(10))
