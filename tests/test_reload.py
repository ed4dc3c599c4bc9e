"""Reload without a restart (issue 12, acceptance 1): SIGHUP and ``monomail reload``.

A real ``monomail serve`` subprocess: its config file is rewritten, then SIGHUP (or
``monomail reload``) makes it read the file again while a client's session stays open.
Mail goes through real SMTP (smtplib) and is read back from the Maildir with the stdlib
``mailbox``; the log is a real file moved as logrotate moves it.
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
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import ROOT, base_config, cli, free_port, privileged_ports, wait_until, write_config

from monomail.config import load
from monomail.reload import keep_restart_only

MSG = b"Subject: %s\r\n\r\nhello\r\n"


def _state(tmp: Path) -> Path:
    return tmp / "spool/public/monomail.pid"


def _started(tmp: Path, proc: Any) -> None:
    """The server is fully up when its state file names it (written after its sockets)."""
    wait_until(lambda: _state(tmp).exists() and _state(tmp).read_text().split()[0] == str(proc.pid))


def _subjects(tmp: Path, user: str) -> list[str]:
    box = mailbox.Maildir(tmp / "mail" / user, factory=None, create=False)
    return sorted(str(m["Subject"]) for m in box)


def _log_count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text) if log.exists() else 0


def _hup(proc: Any, log: Path, text: str = "config reloaded", timeout: float = 15) -> None:
    """SIGHUP, then wait for one more ``text`` line in ``log``."""
    before = _log_count(log, text)
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _log_count(log, text) > before, timeout)


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 2).close()
    except ConnectionRefusedError:
        return True
    return False


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(5)
        return s.recv(100)


def test_sighup_new_alias_is_delivered_while_an_open_session_finishes(tmp_path: Path, process_server: Any):
    server = process_server()
    _started(tmp_path, server.proc)
    pid = server.proc.pid
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as open_session:
        open_session.ehlo("before.test")
        assert open_session.mail("me@remote.test")[0] == 250
        assert open_session.rcpt("alice@example.test")[0] == 250
        write_config(tmp_path, server={"listen": [f"127.0.0.1:{server.port}"]},
                     aliases={**base_config()["aliases"], "sales": ["carol"]})
        _hup(server.proc, server.log)
        # The session open across the reload keeps the config it started with, and finishes.
        assert open_session.rcpt("sales@example.test")[0] == 550
        code, _ = open_session.data(MSG % b"across")
        assert code == 250
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        assert s.sendmail("me@remote.test", ["sales@example.test"], MSG % b"to sales") == {}
    wait_until(lambda: _subjects(tmp_path, "carol") == ["to sales"])
    wait_until(lambda: _subjects(tmp_path, "alice") == ["across"])
    assert server.proc.poll() is None and server.proc.pid == pid
    assert _state(tmp_path).read_text().split()[0] == str(pid)
    assert server.terminate() == 0


def test_sighup_with_a_broken_file_keeps_the_old_config_and_logs_the_error(tmp_path: Path,
                                                                          process_server: Any):
    server = process_server()
    _started(tmp_path, server.proc)
    config = tmp_path / "monomail.toml"
    good = config.read_text()
    config.write_text(good.replace("[server]", "[server]\nmax_recipients = \"ten\"", 1))
    expected = cli("check-config", "-c", str(config)).stderr.strip().removeprefix("monomail: ")
    assert expected.startswith("config error: server.max_recipients:")
    _hup(server.proc, server.log, "reload refused")
    assert f"reload refused, keeping the old config: {expected}" in server.log.read_text()
    assert server.proc.poll() is None
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:  # the old config serves
        assert s.sendmail("me@remote.test", ["team@example.test"], MSG % b"still") == {}
    wait_until(lambda: _subjects(tmp_path, "alice") == ["still"])
    assert server.terminate() == 0


def test_monomail_reload_refused_prints_the_check_config_line_and_exits_2(tmp_path: Path,
                                                                         process_server: Any):
    server = process_server()
    _started(tmp_path, server.proc)
    config = tmp_path / "monomail.toml"
    # Loads as TOML; only reading the certificate (what the server does) refuses it.
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    write_config(tmp_path, server={"listen": [f"127.0.0.1:{server.port}"]},
                 aliases={**base_config()["aliases"], "sales": ["carol"]}, tls={"cert": "bad.pem"})
    expected = cli("check-config", "-c", str(config)).stderr.strip()
    assert expected.startswith("monomail: config error: tls.cert:")
    done = cli("reload", "-c", str(config))
    assert done.returncode == 2, done
    assert done.stderr.strip() == expected
    assert f"reload refused, keeping the old config: {expected.removeprefix('monomail: ')}" in server.log.read_text()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused):  # the new alias did not take over
            s.sendmail("me@remote.test", ["sales@example.test"], MSG % b"no")
        assert s.ehlo()[0] == 250 and b"STARTTLS" not in s.ehlo_resp  # nor its TLS
    # A file that does not even load: the same line, exit 2, the server undisturbed.
    config.write_text("[server\n")
    done = cli("reload", "-c", str(config))
    assert done.returncode == 2
    assert done.stderr.strip() == cli("check-config", "-c", str(config)).stderr.strip()
    assert server.proc.poll() is None
    assert server.terminate() == 0


def test_monomail_reload_taken_exits_0_and_new_mail_follows_it(tmp_path: Path, process_server: Any):
    server = process_server()
    _started(tmp_path, server.proc)
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{server.port}"]},
                          aliases={**base_config()["aliases"], "sales": ["carol"]})
    done = cli("reload", "-c", str(config))
    assert done.returncode == 0, done
    assert f"pid {server.proc.pid}" in done.stdout
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        assert s.sendmail("me@remote.test", ["sales@example.test"], MSG % b"follows") == {}
    wait_until(lambda: _subjects(tmp_path, "carol") == ["follows"])
    assert server.terminate() == 0


def test_monomail_reload_without_a_server_says_so(tmp_path: Path):
    config = write_config(tmp_path)
    done = cli("reload", "-c", str(config))
    assert done.returncode == 1
    assert "no monomail server is running" in done.stderr


def test_restart_only_settings_are_kept_with_a_warning_naming_the_key(tmp_path: Path, process_server: Any):
    server = process_server()
    _started(tmp_path, server.proc)
    write_config(tmp_path, server={"listen": [f"127.0.0.1:{server.port}"], "spool_dir": "elsewhere"},
                 aliases={**base_config()["aliases"], "sales": ["carol"]})
    done = cli("reload", "-c", str(tmp_path / "monomail.toml"))
    # The command finds the server by the file's spool_dir: the moved one names no server.
    assert done.returncode == 1 and "no monomail server" in done.stderr
    _hup(server.proc, server.log)
    assert "server.spool_dir changes only with a restart" in server.log.read_text()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:  # the rest of the file took over
        assert s.sendmail("me@remote.test", ["sales@example.test"], MSG % b"kept") == {}
    wait_until(lambda: _subjects(tmp_path, "carol") == ["kept"])
    assert not (tmp_path / "elsewhere").exists()
    assert server.terminate() == 0


def test_log_file_moved_then_sighup_writes_a_new_file_at_the_configured_path(tmp_path: Path,
                                                                               process_server: Any):
    server = process_server(log={"level": "info", "file": "monomail.log"})
    _started(tmp_path, server.proc)
    log = tmp_path / "monomail.log"
    wait_until(lambda: _log_count(log, "monomail started") == 1)
    rotated = tmp_path / "monomail.log.1"
    log.rename(rotated)  # what logrotate does before it sends SIGHUP
    _hup(server.proc, log)
    assert log.exists() and (log.stat().st_mode & 0o777) == 0o600
    size = rotated.stat().st_size
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        assert s.sendmail("me@remote.test", ["alice@example.test"], MSG % b"logged") == {}
    wait_until(lambda: _log_count(log, "delivered") >= 1)
    assert rotated.stat().st_size == size  # nothing more goes to the moved file
    assert "monomail started" in rotated.read_text() and "monomail started" not in log.read_text()
    assert server.terminate() == 0


def test_listeners_added_and_removed_by_a_reload(tmp_path: Path, process_server: Any):
    server = process_server()
    _started(tmp_path, server.proc)
    first, second = server.port, free_port()
    assert _refuses(second)
    write_config(tmp_path, server={"listen": [f"127.0.0.1:{first}", f"127.0.0.1:{second}"]})
    _hup(server.proc, server.log)
    assert _banner(second).startswith(b"220")
    with smtplib.SMTP("127.0.0.1", first, timeout=10) as open_session:  # open on the port to be closed
        open_session.ehlo("x.test")
        write_config(tmp_path, server={"listen": [f"127.0.0.1:{second}"]})
        _hup(server.proc, server.log)
        wait_until(lambda: _refuses(first))
        assert open_session.sendmail("me@remote.test", ["alice@example.test"], MSG % b"old port") == {}
    assert _banner(second).startswith(b"220")
    wait_until(lambda: _subjects(tmp_path, "alice") == ["old port"])
    assert server.proc.poll() is None
    assert server.terminate() == 0


def test_keep_restart_only_names_each_key_and_keeps_the_old_value(tmp_path: Path):
    old = load(write_config(tmp_path))
    (tmp_path / "new").mkdir()
    cfg = base_config(server={"spool_dir": str(tmp_path / "spool2"), "user": "nobody"})
    path = tmp_path / "new/monomail.toml"
    path.write_text(tomli_w.dumps(cfg))
    kept, warnings = keep_restart_only(old, load(path))
    assert kept.server.spool_dir == old.server.spool_dir and kept.server.user == old.server.user
    assert [w.split()[0] for w in warnings] == ["server.spool_dir", "server.user"]
    same, none = keep_restart_only(old, old)
    assert same == old and none == ()


def test_a_privileged_port_after_giving_up_root_is_logged_and_the_rest_is_kept(unix_account: Any):
    user = unix_account()
    folder = Path(user.pw_dir) / "srv"  # not under tmp_path: root's 0700 folder
    folder.mkdir(mode=0o755)
    port, privileged = privileged_ports(2)
    config = folder / "monomail.toml"
    config.write_text(tomli_w.dumps(base_config(server={"listen": [f"127.0.0.1:{port}"], "user": user.pw_name})))
    log = folder / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "monomail", "serve", "-c", str(config)], cwd=folder,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)
    try:
        _started(folder, proc)
        config.write_text(tomli_w.dumps(base_config(
            server={"listen": [f"127.0.0.1:{port}", f"127.0.0.1:{privileged}"], "user": user.pw_name},
            aliases={**base_config()["aliases"], "sales": ["carol"]})))
        done = cli("reload", "-c", str(config))
        assert done.returncode == 0, done
        assert f"cannot listen on 127.0.0.1:{privileged} (mx)" in done.stderr
        assert f"server.user = '{user.pw_name}'" in done.stderr and "restart" in done.stderr
        assert f"cannot listen on 127.0.0.1:{privileged}" in log.read_text()
        assert _refuses(privileged)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:  # the rest of the new config
            assert s.sendmail("me@remote.test", ["sales@example.test"], MSG % b"rest") == {}
        wait_until(lambda: _subjects(folder, "carol") == ["rest"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait(5)
