"""The fail2ban filter and jail in contrib/fail2ban (issue 9, acceptance 6) against Debian's
fail2ban: ``fail2ban-regex`` on the log a real monomail wrote after real failed AUTHs over TLS
on its submission port, and on lines in the documented format with decoys around them;
``fail2ban-client -t`` on a private fail2ban configuration holding the jail.

The failure line (logger ``monomail.smtp``, WARNING) is::

    2026-12-01 10:40:37,123 WARNING monomail.smtp: auth failed client=[127.0.0.9] user=alice mechanism=PLAIN
"""

from __future__ import annotations

import ast
import base64
import os
import shutil
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ProcessServer, free_port, wait_until, write_config
from peers import self_signed_cert

FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "monomail.conf"
JAIL = ROOT / "contrib" / "fail2ban" / "jail.d" / "monomail.conf"

pytestmark = pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban not installed")


def matched(log: Path) -> list[str]:
    """The host addresses ``fail2ban-regex`` takes from ``log`` with our filter, one per matched line."""
    done = subprocess.run(["fail2ban-regex", "--out", "row", str(log), str(FILTER)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return [ast.literal_eval(line.rstrip(",").replace("\t", " "))[0] for line in done.stdout.splitlines()
            if line.startswith("[")]


def summary(log: Path) -> str:
    done = subprocess.run(["fail2ban-regex", "--print-all-missed", str(log), str(FILTER)], capture_output=True,
                          text=True, timeout=60)
    return done.stdout


# -- the documented format -----------------------------------------------------------------


FAILURES = """\
2026-12-01 10:40:37,123 WARNING monomail.smtp: auth failed client=[127.0.0.9] user=alice mechanism=PLAIN
2026-12-01 10:40:38,001 WARNING monomail.smtp: auth failed client=[127.0.0.10] user=x client=[1.2.3.4] mechanism=LOGIN
2026-12-01 10:40:38,200 WARNING monomail.smtp: auth failed client=[2001:db8::1] user=bob mechanism=LOGIN
2026-12-01 10:40:38,300 WARNING monomail.smtp: auth failed client=[127.0.0.9] user=\\x0a2026-12-01 mechanism=PLAIN
"""

DECOYS = """\
2026-12-01 10:40:39,123 INFO monomail.smtp: auth ok client=[127.0.0.11] user=alice mechanism=PLAIN
2026-12-01 10:40:39,200 INFO monomail.smtp: accepted client=[127.0.0.11] user=alice from=<alice@example.test>
2026-12-01 10:40:40,123 WARNING monomail.smtp: bad command client=[127.0.0.12] "auth failed client=[1.2.3.4] user=a"
2026-12-01 10:40:41,123 INFO monomail.smtp: auth failed client=[127.0.0.13] user=alice mechanism=PLAIN
2026-12-01 10:40:41,200 WARNING monomail.queue: auth failed client=[127.0.0.14] user=alice mechanism=PLAIN
2026-12-01 10:40:41,300 WARNING monomail.smtp: auth failed client=[127.0.0.15] user=alice mechanism=CRAM-MD5 x
2026-12-01 10:40:41,400 WARNING monomail.smtp: too many auth failures client=[127.0.0.16]: 421 4.7.0
"""


def test_filter_matches_the_documented_failure_lines_and_nothing_else(tmp_path: Path) -> None:
    log = tmp_path / "monomail.log"
    log.write_text(DECOYS + FAILURES + DECOYS)
    assert matched(log) == ["127.0.0.9", "127.0.0.10", "2001:db8::1", "127.0.0.9"], summary(log)


def test_a_user_name_holding_client_brackets_cannot_name_another_host(tmp_path: Path) -> None:
    log = tmp_path / "monomail.log"
    log.write_text("2026-12-01 10:40:38,001 WARNING monomail.smtp: auth failed client=[127.0.0.10] "
                   "user=client=[1.2.3.4] client=[5.6.7.8] mechanism=PLAIN\n")
    assert matched(log) == ["127.0.0.10"], summary(log)


def test_the_jail_loads_in_fail2ban(tmp_path: Path) -> None:
    """A private copy of Debian's /etc/fail2ban with only our filter and jail: ``fail2ban-client -t``."""
    if shutil.which("fail2ban-client") is None or not Path("/etc/fail2ban/jail.conf").exists():
        pytest.skip("fail2ban-client or /etc/fail2ban/jail.conf missing")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf, symlinks=True)
    shutil.rmtree(conf / "jail.d")
    (conf / "jail.d").mkdir()
    for local in conf.glob("*.local"):
        local.unlink()
    shutil.copy(FILTER, conf / "filter.d" / "monomail.conf")
    log = tmp_path / "monomail.log"
    log.write_text(FAILURES)
    jail = JAIL.read_text()
    assert "\nlogpath  = /var/log/monomail/monomail.log\n" in jail
    (conf / "jail.d" / "monomail.conf").write_text(jail.replace("/var/log/monomail/monomail.log", str(log)))
    done = subprocess.run(["fail2ban-client", "-c", str(conf), "-t"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    dump = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"], capture_output=True, text=True, timeout=60)
    assert "['add', 'monomail', " in dump.stdout, dump.stdout + dump.stderr
    assert "['set', 'monomail', 'maxretry', 5]" in dump.stdout
    assert f"['set', 'monomail', 'addlogpath', '{log}', 'head']" in dump.stdout
    assert "['port', '25,465,587']" in dump.stdout, dump.stdout


# -- a real log written by a running monomail -------------------------------------------------


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def auth(port: int, source: str, mechanism: str, user: str, password: str) -> int:
    """One session on the submission port from ``source``: STARTTLS, then AUTH → the AUTH reply code."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as c:
        c.ehlo("client.test")
        c.starttls(context=client_context())
        c.ehlo("client.test")
        if mechanism == "PLAIN":
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            code, _ = c.docmd("AUTH", f"PLAIN {token}")
        else:
            code, _ = c.docmd("AUTH", "LOGIN " + base64.b64encode(user.encode()).decode())
            if code == 334:
                code, _ = c.docmd(base64.b64encode(password.encode()).decode())
        return code


@pytest.mark.timeout(120)
def test_filter_matches_a_real_monomail_log_after_failed_auth_over_tls(tmp_path: Path) -> None:
    cert = self_signed_cert(tmp_path / "tls")
    if cert is None:
        pytest.skip("cannot make a self-signed certificate")
    port, submission = free_port(), free_port()
    config = write_config(
        tmp_path,
        server={"listen": [f"127.0.0.1:{port}"], "spool_dir": "spool", "trusted_networks": ["127.0.0.1/32"],
                "shutdown_grace": "5s"},
        tls={"cert": cert[0], "key": cert[1]},
        submission={"listen": [f"127.0.0.1:{submission}"]},
        auth={"password_file": "passwords", "auth_failures": 50},
        log={"level": "info", "file": "log/monomail.log"},
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "monomail", "passwd", "-c", str(config), "alice"],
                          input="correct horse\n", capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    server = ProcessServer(config, port).start()
    try:
        codes = [
            auth(submission, "127.0.0.9", "PLAIN", "alice", "wrong"),
            auth(submission, "127.0.0.9", "LOGIN", "alice", "wrong again"),
            auth(submission, "127.0.0.9", "PLAIN", "nobody", "x"),
            auth(submission, "127.0.0.10", "LOGIN", "x client=[1.2.3.4]", "x"),
            auth(submission, "127.0.0.10", "PLAIN", "evil\nclient=[5.6.7.8]", "x"),
            auth(submission, "127.0.0.11", "PLAIN", "alice", "correct horse"),
            auth(submission, "127.0.0.11", "LOGIN", "alice", "correct horse"),
        ]
        assert codes == [535, 535, 535, 535, 535, 235, 235]
        log = tmp_path / "log" / "monomail.log"
        wait_until(lambda: log.read_text().count("auth failed") >= 5, timeout=15)
    finally:
        server.terminate()
    text = log.read_text()
    assert "127.0.0.11" in text  # the successful sessions were logged too, and are not matched below
    assert matched(log) == ["127.0.0.9", "127.0.0.9", "127.0.0.9", "127.0.0.10", "127.0.0.10"], \
        summary(log) + text[-3000:]


def test_filter_file_is_what_the_jail_names() -> None:
    assert "filter   = monomail\n" in JAIL.read_text()
    assert FILTER.name == "monomail.conf"
