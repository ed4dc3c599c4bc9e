"""Logs an admin can follow (issue 12, acceptance 5).

``monomail serve`` runs as a real process with its log file; the outside world is real
servers on loopback (tests/peers.py: a DNS server, a scripted SMTP peer on 127.0.0.2).
What the admin sees is read back where they see it: the log file (one ``grep QUEUEID``),
and a UNIX datagram socket the test binds in place of ``/dev/log``.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import ROOT, wait_until, write_config

BODY = (b"Subject: the whole story\r\nFrom: alice@example.test\r\nMessage-ID: <story-1@example.test>\r\n"
        b"\r\nline one\r\n")
GREYLIST = "451 4.7.1 greylisted here, come back in a minute"
NO_SUCH_USER = "550 5.1.1 no such user on this peer"


def start(process_server: Any, tmp_path: Path, dns: Any = None, port: int = 9, server: Any = None,
          **log: Any) -> Any:
    extra: dict[str, Any] = {"server": server} if server else {}
    if dns is not None:
        extra |= {"dns": {"nameservers": [dns.address], "timeout": "2s"},
                 "remote": {"port": port, "connect_timeout": "2s", "command_timeout": "5s"}}
    return process_server(log={"level": "info", "file": str(tmp_path / "mail.log"), **log}, **extra)


def send(server: Any, rcpts: list[str], data: bytes = BODY) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("client.example.test")
        assert s.mail("alice@example.test")[0] == 250
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        return s.data(data)


def grep(path: Path, word: str, ignore_case: bool = False) -> list[str]:
    """``grep [-i] WORD path``."""
    fold = str.lower if ignore_case else str
    return [line for line in path.read_text(encoding="utf-8").splitlines() if fold(word) in fold(line)]


def test_one_grep_of_the_queue_id_tells_the_whole_story(process_server, tmp_path, dns, port, peers):
    dns.mx("far.test", (10, "mx.far.test"))
    dns.a("mx.far.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, rcpt_replies={"bob": GREYLIST})
    server = start(process_server, tmp_path, dns, port)
    logfile = tmp_path / "mail.log"
    code, text = send(server, ["carol@example.test", "bob@far.test"])
    assert code == 250 and b"queued" in text, text
    qid = re.search(rb"queued as (\w+)", text).group(1).decode()  # type: ignore[union-attr]
    wait_until(lambda: grep(logfile, f"{qid}: queued"))
    peer.rcpt_replies["bob"] = NO_SUCH_USER  # the retry (1 s later) is refused for good
    wait_until(lambda: grep(logfile, f"{qid}: removed"), timeout=30)
    story = grep(logfile, qid)
    text_of = "\n".join(story)
    # every line found by the queue id starts (its message part) with it
    assert all(re.match(rf"\S+ \S+ \w+ [\w.]+: {qid}: ", line) for line in story), text_of
    received = [line for line in story if f"{qid}: received " in line]
    assert len(received) == 1, text_of
    assert "from=<alice@example.test>" in received[0] and "message-id=<story-1@example.test>" in received[0]
    assert "client=[127.0.0.1]" in received[0] and "helo=client.example.test" in received[0]
    session = re.search(r"session=(\w+)", received[0]).group(1)  # type: ignore[union-attr]
    assert re.search(rf"{qid}: to=<carol@example.test> status=delivered .*maildir", text_of)
    deferred = [line for line in story if "to=<bob@far.test> status=deferred" in line]
    assert deferred and "relay=mx.far.test" in deferred[0] and GREYLIST in deferred[0], text_of
    assert "127.0.0.2" in deferred[0]  # the host that answered, in the cause
    failed = [line for line in story if "to=<bob@far.test> status=failed" in line]
    assert failed and NO_SUCH_USER in failed[0] and "relay=mx.far.test" in failed[0], text_of
    assert re.search(rf"{qid}: bounce \w+ to <alice@example.test> for bob@far.test", text_of)
    assert text_of.index("received") < text_of.index("status=deferred") < text_of.index("status=failed") \
        < text_of.index(f"{qid}: removed")
    # the session id ties the connection's lines: the received line and the first attempt's
    assert len(grep(logfile, f"session={session}")) >= 3
    assert server.terminate() == 0


def test_lines_of_the_remote_client_start_with_the_queue_id(process_server, tmp_path, dns, port):
    dns.mx("down.test", (10, "mx.down.test"))
    dns.a("mx.down.test", "127.0.0.3")  # nobody listens there: connection refused
    server = start(process_server, tmp_path, dns, port)
    code, text = send(server, ["dan@down.test"])
    qid = re.search(rb"queued as (\w+)", text).group(1).decode()  # type: ignore[union-attr]
    logfile = tmp_path / "mail.log"
    wait_until(lambda: grep(logfile, f"{qid}: queued"))
    # remote.py does not know the queue id; the line says it all the same (maillog.about)
    (line,) = [x for x in grep(logfile, "down.test: ") if "to=<" not in x]
    assert f"monomail.remote: {qid}: down.test: 4" in line and "127.0.0.3" in line, line
    assert server.terminate() == 0


def test_refused_recipients_are_logged_with_client_helo_and_sender(process_server, tmp_path):
    server = start(process_server, tmp_path, server={"trusted_networks": ["192.0.2.0/24"]})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("spammer.example")
        assert s.mail("someone@elsewhere.test")[0] == 250
        assert s.rcpt("victim@remote.test")[0] == 554  # relay refused
        assert s.rcpt("nobody@example.test")[0] == 550  # unknown user
    logfile = tmp_path / "mail.log"
    wait_until(lambda: len(grep(logfile, "refused RCPT", ignore_case=True)) == 2)
    relay, unknown = grep(logfile, "refused RCPT", ignore_case=True)  # (smtplib writes "rcpt")
    for line in (relay, unknown):
        assert "client=[127.0.0.1] helo=spammer.example from=<someone@elsewhere.test>" in line
        assert re.search(r"session=\w+$", line), line
    assert "TO:<victim@remote.test>" in relay and "reply=554 5.7.1" in relay
    assert "TO:<nobody@example.test>" in unknown and "reply=550 5.1.1" in unknown
    assert relay.rsplit("session=", 1)[1] == unknown.rsplit("session=", 1)[1]  # one connection, one id
    assert server.terminate() == 0


def datagrams(sock: socket.socket, want: str, timeout: float = 15) -> list[bytes]:
    got: list[bytes] = []

    def more() -> bool:
        try:
            while True:
                got.append(sock.recv(65536))
        except BlockingIOError:
            pass
        return any(want.encode() in d for d in got)

    sock.setblocking(False)
    wait_until(more, timeout)
    return got


def test_syslog_lines_reach_the_socket_with_facility_mail(process_server, tmp_path):
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        server = start(process_server, tmp_path, syslog=True, syslog_socket=str(path))
        code, text = send(server, ["carol@example.test"])
        assert code == 250, text
        qid = re.search(rb"delivered as (\w+)", text).group(1).decode()  # type: ignore[union-attr]
        got = datagrams(sock, f"{qid}: to=<carol@example.test> status=delivered")
    mine = [d.decode() for d in got if qid.encode() in d]
    received = next(d for d in mine if "received from=" in d)
    pid = server.proc.pid
    # <22>: facility mail (2) * 8 + severity info (6); the tag names the process
    assert received.startswith(f"<22>monomail[{pid}]: monomail.mail: {qid}: received from=<alice@example.test>")
    assert "message-id=<story-1@example.test>" in received
    assert all(re.match(r"<2\d>", d.decode()) for d in got)  # every line: facility mail
    assert grep(tmp_path / "mail.log", f"{qid}: received")  # and the file has them too
    assert server.terminate() == 0


def test_a_missing_syslog_socket_is_one_warning_and_lines_arrive_once_it_is_there(process_server, tmp_path):
    path = tmp_path / "late.sock"
    server = start(process_server, tmp_path, syslog=True, syslog_socket=str(path))
    logfile = tmp_path / "mail.log"
    assert len(grep(logfile, "syslog socket")) == 1
    assert send(server, ["carol@example.test"])[0] == 250  # serving all the same
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        code, text = send(server, ["carol@example.test"])
        qid = re.search(rb"delivered as (\w+)", text).group(1).decode()  # type: ignore[union-attr]
        datagrams(sock, f"{qid}: received")
    assert server.terminate() == 0
    assert "Traceback" not in logfile.read_text() and "Logging error" not in server.log.read_text()


def test_json_format_is_one_object_a_line(process_server, tmp_path):
    server = start(process_server, tmp_path, format="json")
    code, text = send(server, ["carol@example.test"])
    assert code == 250
    qid = re.search(rb"delivered as (\w+)", text).group(1).decode()  # type: ignore[union-attr]
    logfile = tmp_path / "mail.log"
    wait_until(lambda: f"{qid}: to=<carol@example.test> status=delivered" in logfile.read_text())
    assert server.terminate() == 0
    objects = [json.loads(line) for line in logfile.read_text(encoding="utf-8").splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(o) for o in objects)
    received = next(o for o in objects if "received from=" in o["message"])
    assert received["queue_id"] == qid and received["logger"] == "monomail.mail" and received["level"] == "info"
    assert re.fullmatch(r"\w{12}", received["session"])
    assert received["time"].startswith("20") and received["time"].endswith("+00:00")
    delivered = next(o for o in objects if "status=delivered" in o["message"])
    assert delivered["queue_id"] == qid and delivered["session"] == received["session"]


REOPEN = """
import logging, os, sys
from pathlib import Path
from monomail import logsetup
from monomail.config import load
logsetup.setup(load(Path(sys.argv[1])))
log = logging.getLogger("monomail.test")
log.info("before the move")
os.rename(sys.argv[2], sys.argv[2] + ".1")
log.info("after the move, before reopen")
logsetup.reopen()
log.info("after reopen")
"""


def test_reopen_starts_a_new_file_at_the_configured_path(tmp_path):
    """What SIGHUP calls after logrotate moved the file (``logsetup.reopen``)."""
    logfile = tmp_path / "log" / "mail.log"
    path = write_config(tmp_path, log={"level": "info", "file": str(logfile)})
    out = subprocess.run([sys.executable, "-c", REOPEN, str(path), str(logfile)], capture_output=True, text=True,
                         timeout=30, env={"PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    old = Path(f"{logfile}.1").read_text()
    assert "before the move" in old and "after the move, before reopen" in old and "after reopen" not in old
    assert "after reopen" in logfile.read_text() and "before" not in logfile.read_text()
    assert logfile.stat().st_mode & 0o777 == 0o600
