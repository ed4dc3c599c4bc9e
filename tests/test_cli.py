"""The ``monomail`` command as an admin uses it: serve, SIGTERM, queue list, --version."""

from __future__ import annotations

import contextlib
import mailbox
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("monomail ")


def _quickstart(folder: Path, user: pwd.struct_passwd | None) -> subprocess.Popen[bytes]:
    """`monomail serve` in ``folder`` on the bundled config, as ``user`` (None: as we are)."""
    argv = [sys.executable, "-m", "monomail", "serve"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if user is not None:
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *argv]
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    log = (folder / "server.log").open("ab")
    return subprocess.Popen(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_quickstart_bundled_config_serves_and_delivers(tmp_path: Path, request: pytest.FixtureRequest):
    """The README's quick start: `monomail serve` on the bundled monomail.toml, without root
    (as root, the test runs it as a throwaway account: the bundled file works unchanged)."""
    user = None
    folder = tmp_path
    if os.geteuid() == 0:
        user = request.getfixturevalue("unix_account")()
        folder = Path(user.pw_dir) / "quickstart"
        folder.mkdir()
        os.chown(folder, user.pw_uid, user.pw_gid)
    shutil.copy(ROOT / "monomail.toml", folder / "monomail.toml")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 2525)) == 0:
            pytest.skip("port 2525 is busy on this machine")
    proc = _quickstart(folder, user)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert proc.poll() is None, (folder / "server.log").read_text()[-2000:]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 2525), 0.2):
                break
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
            assert s.sendmail("me@remote.test", ["alice@example.test", "bob@example.test"],
                              b"Subject: quick start\r\n\r\nhi\r\n") == {}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert [m["Subject"] for m in mailbox.Maildir(folder / "var/mail/alice", factory=None)] == ["quick start"]
    assert [m["Subject"] for m in mailbox.mbox(folder / "var/mail/bob")] == ["quick start"]
    log = (folder / "server.log").read_text()
    assert "received from=<me@remote.test>" in log and "status=delivered" in log
    if user is not None:  # every file it made is the account's own
        made = [p for p in (folder / "var").rglob("*")]
        assert made and {p.lstat().st_uid for p in made} == {user.pw_uid}


def test_quickstart_as_root_refuses_without_a_mode(tmp_path: Path):
    """Run as root on the bundled config (no server.user, no system accounts), monomail
    says which mode to choose, and writes nothing: no mailbox only root could read."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    shutil.copy(ROOT / "monomail.toml", tmp_path / "monomail.toml")
    out = cli("serve", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "config error: server.user: monomail is started as root" in out.stderr
    assert "local.system_accounts" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monomail.toml"]


def test_sigterm_lets_a_session_in_flight_finish(process_server):
    server = process_server()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo()
        s.mail("me@remote.test")
        s.rcpt("alice@example.test")
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # No new connections once stopping...
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        # ...but the transaction in flight completes.
        code, text = s.data(b"Subject: in flight\r\n\r\nbody\r\n")
        assert code == 250, text
    assert server.proc.wait(15) == 0
    box = mailbox.Maildir(server.config_path.parent / "mail/alice", factory=None)
    assert [m["Subject"] for m in box] == ["in flight"]


def test_queue_list_shows_deferred_mail(process_server, tmp_path: Path):
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "bob.lock").write_text("0\n")  # someone else holds bob's mbox (no pid: honoured)
    server = process_server(local={"lock_timeout": "0.05s"}, queue={"retry": ["1h"]})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        assert s.sendmail("me@remote.test", ["bob@example.test", "alice@example.test"],
                          b"Subject: deferred\r\n\r\n" + b"x" * 100 + b"\r\n") == {}
    out = cli("queue", "list", "-c", str(server.config_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "from <me@remote.test>" in lines[0] and "age " in lines[0] and "size " in lines[0]
    assert "deferred <bob@example.test>  attempts 1" in out.stdout
    assert "alice" not in out.stdout  # delivered at once, not deferred
    assert "last reply: 450 4.2.0 Mailbox busy" in out.stdout
    assert "cause: mbox " in out.stdout and "bob" in out.stdout  # which mailbox, and why
    assert "next attempt in" in out.stdout
    assert lines[-1] == "-- 1 message(s) in queue"
    assert server.terminate() == 0
    # After a restart with the lock gone, the retry delivers (flush by restart: next attempt
    # is an hour away, so move it: the spool is plain JSON an admin may edit).
    (tmp_path / "mail" / "bob.lock").unlink()
    for f in (tmp_path / "spool").glob("*.json"):
        f.write_text(f.read_text().replace('"next_attempt":', '"next_attempt": 0, "x":'))
    server.start()
    deadline = time.monotonic() + 15
    while list((tmp_path / "spool").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [m["Subject"] for m in mailbox.mbox(tmp_path / "mail/bob")] == ["deferred"]
    assert cli("queue", "list", "-c", str(server.config_path)).stdout.strip() == "queue is empty"


def test_queue_list_escapes_what_the_spool_holds(tmp_path: Path):
    """A sender with a terminal escape and a byte that is not UTF-8 reaches the terminal
    escaped (``maillog.printable``), never raw."""
    from conftest import write_config

    from monomail.spool import Spool

    path = write_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    spool.create()
    spool.journal_new("evil\x1b[2J\udcff@remote.test", ["alice@example.test"], b"x\n")
    out = cli("queue", "list", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert "from <evil\\x1b[2J\\xff@remote.test>" in out.stdout and "\x1b" not in out.stdout
