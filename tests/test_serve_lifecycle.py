"""``monomail serve`` as a process an admin leaves running: the modes of what it creates
(whatever the umask), start-up clean-up of Maildir ``tmp/``, and a stop that stays within
its grace while an mbox write is blocked by another program's lock.

Everything runs as real subprocesses; mailboxes are real files.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT, free_port, write_config

HOLD_LOCK = """\
import fcntl, os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
with open(path + ".lock", "w") as f:
    f.write(f"{os.getpid()}\\n")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def start_serve(config: Path, port: int, log: Path, **popen) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "monomail", "serve", "-c", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=config.parent, env=env, **popen)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2) as s:
                s.recv(100)
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start")


def test_blocked_mbox_write_does_not_hold_up_shutdown(tmp_path: Path):
    """Defect 15: SIGTERM while mbox writes wait for another program's lock: the server
    stops within its grace (not after the lock timeout) and logs no InvalidStateError."""
    port = free_port()
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{port}"], "spool_dir": "spool",
                                            "shutdown_grace": "2s"},
                          local={"lock_timeout": "30s"})
    mail = tmp_path / "mail"
    mail.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(mail / "bob"), "60"], stdout=subprocess.PIPE)
    log = tmp_path / "server.log"
    proc = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        proc = start_serve(config, port, log)

        def send(n: int) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.sendmail("me@remote.test", ["bob@example.test"], f"Subject: blocked {n}\r\n\r\nx\r\n".encode())
            except (OSError, smtplib.SMTPException):
                pass  # the server stopped under us before any 250: nothing was promised

        senders = [threading.Thread(target=send, args=(n,)) for n in range(3)]
        for t in senders:
            t.start()
        time.sleep(1.0)  # every message is now waiting for bob's mbox
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        took = time.monotonic() - started
        for t in senders:
            t.join(20)
    finally:
        holder.kill()
        holder.wait(5)
        if proc and proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "InvalidStateError" not in text and "Traceback" not in text, text
    assert "never retrieved" not in text, text
    assert took < 4.5, f"stopping took {took:.1f}s with a 2s grace"
    assert (mail / "bob").read_bytes() == b""  # nothing was written under the other program's lock


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_modes_do_not_depend_on_the_umask(tmp_path: Path):
    """Defect 14: under umask 000, what serve creates is still private."""
    port = free_port()
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{port}"], "spool_dir": "var/spool/monomail"},
                          local={"mail_dir": "var/mail"}, log={"level": "info", "file": "var/log/monomail/mail.log"})
    proc = start_serve(config, port, tmp_path / "stdout.log", preexec_fn=lambda: os.umask(0))
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.sendmail("me@remote.test", ["alice@example.test"], b"Subject: modes\r\n\r\nx\r\n") == {}
        var = tmp_path / "var"
        assert mode(var / "mail") == 0o700  # where .forward and recipes are read
        # the spool: traversable, not listable; its public corner as issue 11 lays it out
        spool = var / "spool" / "monomail"
        assert mode(var / "spool") == 0o700 and mode(spool) == 0o711
        assert mode(spool / "public") == 0o755 and mode(spool / "public" / "maildrop") == 0o1733
        assert mode(spool / "public" / "monomail.pid") == 0o644
        assert mode(spool / "public" / "submit") == 0o666 and mode(spool / "public" / "showq") == 0o666
        assert mode(var / "log" / "monomail") == 0o700
        assert mode(var / "log" / "monomail" / "mail.log") == 0o600
        assert mode(var / "spool" / "monomail" / ".serve.lock") == 0o600
        assert "started" in (var / "log" / "monomail" / "mail.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_stale_maildir_tmp_files_are_removed_at_start(tmp_path: Path):
    """Defect 15: a kill leaves files in a Maildir's tmp/; those older than 36 h go at start-up."""
    port = free_port()
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{port}"], "spool_dir": "spool"})
    tmp = tmp_path / "mail" / "alice" / "tmp"
    for sub in ("tmp", "new", "cur"):
        (tmp.parent / sub).mkdir(parents=True)
    old, fresh = tmp / "1.M1P1Q1.host", tmp / "2.M2P2Q2.host"
    old.write_bytes(b"half a message")
    fresh.write_bytes(b"being written")
    two_days_ago = time.time() - 48 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    proc = start_serve(config, port, tmp_path / "server.log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not old.exists() and fresh.exists()
    assert "removed 1 stale file(s) from tmp/" in (tmp_path / "server.log").read_text()
