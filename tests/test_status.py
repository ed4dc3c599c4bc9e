"""Issue 12, acceptance 4: ``monomail status`` is 0 while the server serves, non-zero with
the reason when it is stopped, hung (SIGSTOP) or its queue runner is not alive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli, free_port, wait_until, write_config

pytestmark = pytest.mark.timeout(90)


def status(config: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    out = cli("status", "-c", str(config), *extra, timeout=30)
    return out, time.monotonic() - started


def public(config: Path) -> Path:
    return config.parent / "spool" / "public"


def test_status_while_serving_hung_and_stopped(process_server):
    server = process_server()
    wait_until(lambda: (public(server.config_path) / "heartbeat").exists())
    assert server.proc is not None
    pid = server.proc.pid

    out, _ = status(server.config_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"monomail status: ok: pid {pid} answered 220 on 127.0.0.1:{server.port} in ")
    assert "queue runner beat" in out.stdout and out.stdout.count("\n") == 1

    os.kill(pid, signal.SIGSTOP)  # the process is there, its port accepts in the kernel, nobody greets
    try:
        out, took = status(server.config_path, "--timeout", "1")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert out.returncode == 1
    assert out.stderr == f"monomail status: pid {pid}: no SMTP banner on 127.0.0.1:{server.port} within 1s " \
                         "(hung, overloaded or stopped)\n"
    assert took < 10
    wait_until(lambda: status(server.config_path)[0].returncode == 0)

    assert server.terminate() == 0
    out, _ = status(server.config_path)
    assert out.returncode == 1
    assert out.stderr.startswith("monomail status: not running: no state file ")
    assert str(public(server.config_path) / "monomail.pid") in out.stderr


def fake_server(tmp_path: Path, peers: Any, *, pid: int, heartbeat_age: float | None) -> Path:
    """A config whose first listener is a scripted SMTP peer, and a state file naming ``pid``:
    what a server whose queue runner has stopped looks like from outside."""
    peer = peers("127.0.0.1", 0)
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{peer.port}"], "spool_dir": "spool"})
    folder = public(config)
    folder.mkdir(parents=True)
    (folder / "monomail.pid").write_text(f"{pid}\nuid {os.geteuid()}\n")
    if heartbeat_age is not None:
        beat = folder / "heartbeat"
        beat.touch()
        then = time.time() - heartbeat_age
        os.utime(beat, (then, then))
    return config


def test_status_says_the_runner_is_stale(tmp_path, peers):
    config = fake_server(tmp_path, peers, pid=os.getpid(), heartbeat_age=60)
    out, _ = status(config)
    assert out.returncode == 1
    assert "banner ok on 127.0.0.1:" in out.stderr
    assert "the queue runner is not alive (last heartbeat 60s ago, more than 20s)" in out.stderr


def test_status_says_the_runner_has_no_heartbeat(tmp_path, peers):
    config = fake_server(tmp_path, peers, pid=os.getpid(), heartbeat_age=None)
    out, _ = status(config)
    assert out.returncode == 1
    assert "the queue runner has no heartbeat" in out.stderr


def test_status_fresh_heartbeat_and_banner_is_ok(tmp_path, peers):
    config = fake_server(tmp_path, peers, pid=os.getpid(), heartbeat_age=2)
    out, _ = status(config)
    assert out.returncode == 0, out.stderr
    assert f"ok: pid {os.getpid()} answered 220" in out.stdout


def test_status_after_a_crash_names_the_gone_pid(tmp_path, peers):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    config = fake_server(tmp_path, peers, pid=dead.pid, heartbeat_age=1)
    out, _ = status(config)
    assert out.returncode == 1
    assert out.stderr.startswith(f"monomail status: not running: pid {dead.pid} (from ")
    assert out.stderr.rstrip().endswith("is gone")


def test_status_nobody_listening(tmp_path):
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{free_port()}"], "spool_dir": "spool"})
    folder = public(config)
    folder.mkdir(parents=True)
    (folder / "monomail.pid").write_text(f"{os.getpid()}\n")
    out, took = status(config, "--timeout", "2")
    assert out.returncode == 1 and "no SMTP banner on 127.0.0.1:" in out.stderr and "refused" in out.stderr
    assert took < 10


def test_bad_config_is_exit_2(tmp_path):
    (tmp_path / "monomail.toml").write_text("[server]\nlisten = 5\n")
    out, _ = status(tmp_path / "monomail.toml")
    assert out.returncode == 2 and "config error" in out.stderr


def test_dockerfile_healthcheck_uses_status():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'HEALTHCHECK --interval=30s --timeout=5s CMD ["monomail", "status", "-c", ' \
           '"/etc/monomail/monomail.toml"]' in dockerfile
    assert "check-config" not in dockerfile.split("HEALTHCHECK", 1)[1].splitlines()[0]


def test_the_runner_touches_its_heartbeat_by_itself(serve):
    server = serve()
    beat = server.config.server.spool_dir / "public" / "heartbeat"
    assert beat.exists() and beat.stat().st_mode & 0o777 == 0o644
    first = beat.stat().st_mtime
    wait_until(lambda: beat.stat().st_mtime > first, timeout=12)  # no mail, no wake-up: the 5 s beat
