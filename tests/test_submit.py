"""``monomail sendmail`` as cron, PHP, git send-email and mutt use it: a real subprocess
fed on stdin, a real server (or none), mailboxes read back with stdlib ``mailbox``."""

from __future__ import annotations

import email
import mailbox
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ProcessServer, free_port, wait_until, write_config

LOGIN = pwd.getpwuid(os.getuid()).pw_name
CRON_MESSAGE = (
    "From: root (Cron Daemon)\n"
    "To: alice\n"
    "Bcc: bob@example.test\n"
    "Subject: Cron <root@host> /usr/local/bin/backup --nightly\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "X-Cron-Env: <SHELL=/bin/sh>\n"
    "X-Cron-Env: <HOME=/root>\n"
    "X-Cron-Env: <PATH=/usr/bin:/bin>\n"
    "X-Cron-Env: <LOGNAME=root>\n"
    "\n"
    "backup done: 3 files, naïve Größe 1,2 GB\n"
    ".\n"
    "a line after a lone dot\n"
).encode()


def sendmail(config: Path, *args: str, stdin: bytes = b"", timeout: float = 25) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONOMAIL_CONFIG": str(config)}
    proc = subprocess.run([sys.executable, "-m", "monomail.sendmail", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=env, cwd=config.parent)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def maildir_messages(root: Path, user: str) -> list[bytes]:
    folder = root / "mail" / user
    if not (folder / "new").is_dir():
        return []
    box = mailbox.Maildir(folder, factory=None, create=False)
    return [box.get_bytes(key) for key in box.iterkeys()]


def mbox_messages(root: Path, user: str) -> list[bytes]:
    path = root / "mail" / user
    if not path.exists():
        return []
    box = mailbox.mbox(path, create=False)
    return [box.get_bytes(key) for key in box.iterkeys()]


def spool_entries(root: Path) -> list[Path]:
    return sorted((root / "spool").glob("*.json"))


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("monomail sendmail: ")
    return lines[0]


def headers(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw)


# -- (a) the server is running ---------------------------------------------------------


def test_cron_message_with_t_and_i_goes_through_the_running_server(process_server, tmp_path: Path):
    server = process_server()
    result = sendmail(server.config_path, "-t", "-i", stdin=CRON_MESSAGE)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    wait_until(lambda: maildir_messages(tmp_path, "alice") and mbox_messages(tmp_path, "bob"))
    [for_alice] = maildir_messages(tmp_path, "alice")
    [for_bob] = mbox_messages(tmp_path, "bob")
    for raw in (for_alice, for_bob):
        msg = headers(raw)
        assert b"\nBcc:" not in raw and not raw.startswith(b"Bcc:")
        assert "bob@example.test" not in str(msg.get_all("To"))
        assert len(msg.get_all("Date")) == 1 and len(msg.get_all("Message-ID")) == 1
        assert msg["Message-ID"].endswith("@mx.example.test>")
        assert msg["From"] == "root@example.test (Cron Daemon)"  # qualified in place (append_at_myorigin)
        assert msg["To"] == "alice@example.test"
        assert msg["Subject"] == "Cron <root@host> /usr/local/bin/backup --nightly"
        assert len(msg.get_all("X-Cron-Env")) == 4
        body = raw.split(b"\n\n", 1)[1]
        # 8-bit text intact, and with -i the lone '.' is content, not the end.
        assert "naïve Größe".encode() in body
        assert b"\n.\na line after a lone dot\n" in body
        received = msg.get_all("Received")
        assert any("with ESMTP" in r for r in received), received  # came in over SMTP
        # over the local socket: the server names the user by the socket's peer credentials
        assert any(f"from {LOGIN} (uid {os.getuid()})" in r and "local submission" in r for r in received), received
    assert headers(for_alice)["Delivered-To"] == "alice@example.test"
    assert headers(for_bob)["Return-Path"] == f"<{LOGIN}@example.test>"
    assert not spool_entries(tmp_path)


def test_arguments_sender_and_full_name(process_server, tmp_path: Path):
    server = process_server()
    message = b"Subject: from git\r\nTo: alice@example.test\r\n\r\npatch body\r\n"
    result = sendmail(server.config_path, "-i", "-f", "dev@remote.test", "-F", "Jane Doe", "--",
                      "alice", "bob@example.test", stdin=message)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: maildir_messages(tmp_path, "alice") and mbox_messages(tmp_path, "bob"))
    for raw in (maildir_messages(tmp_path, "alice")[0], mbox_messages(tmp_path, "bob")[0]):
        msg = headers(raw)
        assert msg["Return-Path"] == "<dev@remote.test>"
        assert msg["From"] == "Jane Doe <dev@remote.test>"
        assert msg["Subject"] == "from git"
        assert raw.endswith(b"patch body\n")
        assert b"\r" not in raw


def test_attached_values_and_ignored_flags(process_server, tmp_path: Path):
    """Debian cron's own command line, and mutt's."""
    server = process_server()
    cron = sendmail(server.config_path, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-odi", "alice",
                    stdin=b"Subject: cron style\n\nout\n")
    mutt = sendmail(server.config_path, "-oem", "-oi", "-N", "failure,delay", "-L", "tag", "-C", "/nonexistent",
                    "-fme@example.test", "--", "alice@example.test", stdin=b"Subject: mutt style\n\nhi\n")
    assert (cron.returncode, mutt.returncode) == (0, 0), cron.stderr + mutt.stderr
    wait_until(lambda: len(maildir_messages(tmp_path, "alice")) == 2)
    by_subject = {headers(m)["Subject"]: headers(m) for m in maildir_messages(tmp_path, "alice")}
    assert by_subject["cron style"]["From"] == f"CronDaemon <{LOGIN}@example.test>"
    assert by_subject["mutt style"]["Return-Path"] == "<me@example.test>"


def test_without_i_a_lone_dot_ends_the_message(process_server, tmp_path: Path):
    server = process_server()
    result = sendmail(server.config_path, "alice", stdin=b"Subject: dot\n\nline one\n.\nnever sent\n")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: maildir_messages(tmp_path, "alice"))
    [raw] = maildir_messages(tmp_path, "alice")
    assert raw.split(b"\n\n", 1)[1] == b"line one\n"


def test_long_lines_and_bare_message_are_delivered(process_server, tmp_path: Path):
    """No header section at all, CR-LF and a 3,000-character line: still delivered."""
    server = process_server()
    long_line = b"x" * 3000
    result = sendmail(server.config_path, "alice", stdin=b"just output\r\n" + long_line + b"\r\n")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: maildir_messages(tmp_path, "alice"))
    [raw] = maildir_messages(tmp_path, "alice")
    msg = headers(raw)
    assert f"{LOGIN}@example.test" in msg["From"]
    body = raw.split(b"\n\n", 1)[1]
    assert body.startswith(b"just output\n")
    assert all(len(line) <= 998 for line in raw.split(b"\n"))
    assert body.replace(b"\n ", b"").count(b"x") == 3000


def test_unknown_user_is_67_and_the_others_still_get_it(process_server, tmp_path: Path):
    server = process_server()
    result = sendmail(server.config_path, "nobody@example.test", "alice", stdin=b"Subject: partly\n\nx\n")
    assert result.returncode == 67
    line = one_line_error(result)
    assert "nobody@example.test" in line and "5.1.1" in line
    wait_until(lambda: maildir_messages(tmp_path, "alice"))
    assert not spool_entries(tmp_path)


def test_verbose_says_what_happened(process_server, tmp_path: Path):
    server = process_server()
    result = sendmail(server.config_path, "-v", "alice", stdin=b"Subject: v\n\nx\n")
    assert result.returncode == 0
    assert "sent to <alice@example.test>: 250" in result.stderr
    assert "Traceback" not in result.stderr


def test_q_flushes_the_queue_of_the_running_server(process_server, tmp_path: Path):
    """A message deferred (mbox locked by another program) is retried at once by -q,
    not an hour later as the schedule says."""
    server = process_server(queue={"retry": ["1h"]}, local={"lock_timeout": "0.2s"})
    (tmp_path / "mail").mkdir(exist_ok=True)
    lock = tmp_path / "mail" / "bob.lock"
    lock.write_text("0\n")  # a foreign dot-lock with no pid (dotlockfile, procmail): honoured
    result = sendmail(server.config_path, "bob", stdin=b"Subject: deferred\n\nx\n")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(spool_entries(tmp_path)) == 1)
    assert not mbox_messages(tmp_path, "bob")
    lock.unlink()
    flush = sendmail(server.config_path, "-q")
    assert flush.returncode == 0, flush.stderr
    assert "notified" in flush.stdout
    wait_until(lambda: mbox_messages(tmp_path, "bob") and not spool_entries(tmp_path), timeout=10)
    assert headers(mbox_messages(tmp_path, "bob")[0])["Subject"] == "deferred"


def test_bs_speaks_smtp_on_stdio(process_server, tmp_path: Path):
    server = process_server()
    script = (
        b"EHLO client.test\r\n"
        b"MAIL FROM:<php@example.test> BODY=8BITMIME\r\n"
        b"RCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<nobody@example.test>\r\n"
        b"RCPT TO:<bob>\r\n"
        b"DATA\r\n"
        b"Subject: over -bs\r\n"
        b"\r\n"
        b"..a dot-stuffed line\r\n"
        b"last\n"  # a bare LF line is fine on stdio
        b".\r\n"
        b"QUIT\r\n"
    )
    result = sendmail(server.config_path, "-bs", stdin=script)
    assert result.returncode == 0, result.stderr
    codes = [line[:4] for line in result.stdout.splitlines()]
    assert codes[0] == "220 "
    finals = [c[:3] for c in codes if c[3] == " "]
    # greeting, EHLO, MAIL, RCPT ok, RCPT unknown, RCPT ok, DATA 354, end of data, QUIT
    assert finals == ["220", "250", "250", "250", "550", "250", "354", "250", "221"], result.stdout
    assert "5.1.1" in result.stdout
    wait_until(lambda: maildir_messages(tmp_path, "alice") and mbox_messages(tmp_path, "bob"))
    [raw] = maildir_messages(tmp_path, "alice")
    msg = headers(raw)
    assert msg["Return-Path"] == "<php@example.test>"
    assert raw.split(b"\n\n", 1)[1] == b".a dot-stuffed line\nlast\n"
    assert msg["Message-ID"] and msg["Date"]


# -- (b) no server running -----------------------------------------------------------


def _stopped_config(tmp_path: Path) -> tuple[Path, int]:
    port = free_port()
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{port}"], "spool_dir": "spool",
                                            "shutdown_grace": "5s"})
    return config, port


def test_without_a_server_the_message_is_spooled_and_delivered_at_start(tmp_path: Path):
    config, port = _stopped_config(tmp_path)
    result = sendmail(config, "-t", "-i", stdin=CRON_MESSAGE)
    assert result.returncode == 0, result.stderr
    [entry] = spool_entries(tmp_path)
    qid = entry.stem
    data = entry.with_suffix(".msg").read_bytes()
    assert data.startswith(b"Received: by mx.example.test (monomail sendmail, from userid ")
    assert f"with local id {qid}".encode() in data
    assert b"\nBcc:" not in data and b"\r" not in data
    assert not maildir_messages(tmp_path, "alice")

    listed = sendmail(config, "-bp")
    assert listed.returncode == 0, listed.stderr
    assert qid in listed.stdout and "<alice@example.test>" in listed.stdout and "<bob@example.test>" in listed.stdout

    server = ProcessServer(config, port)
    try:
        server.start()
        wait_until(lambda: maildir_messages(tmp_path, "alice") and mbox_messages(tmp_path, "bob")
                   and not spool_entries(tmp_path))
    finally:
        if server.proc and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(5)
    for raw in (maildir_messages(tmp_path, "alice")[0], mbox_messages(tmp_path, "bob")[0]):
        msg = headers(raw)
        assert msg["Return-Path"] == f"<{LOGIN}@example.test>"
        assert b"\nBcc:" not in raw
        assert any(f"with local id {qid}" in r for r in msg.get_all("Received"))
        assert "naïve Größe".encode() in raw


def test_without_a_server_unknown_users_are_refused_and_the_rest_spooled(tmp_path: Path):
    config, _ = _stopped_config(tmp_path)
    result = sendmail(config, "alice", "nobody", stdin=b"Subject: x\n\ny\n")
    assert result.returncode == 67
    assert "<nobody@example.test>: 550 5.1.1" in one_line_error(result)
    [entry] = spool_entries(tmp_path)
    assert '"alice@example.test"' in entry.read_text() and "nobody" not in entry.read_text()


def test_stale_pid_file_of_a_foreign_process_is_not_signalled(tmp_path: Path):
    """The PID file names a live process that is not monomail (no listener): the message
    is spooled after a short wait, and that process is left alone."""
    config, _ = _stopped_config(tmp_path)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "spool" / "public").mkdir(parents=True)
        (tmp_path / "spool" / "public" / "monomail.pid").write_text(f"{sleeper.pid}\n")
        result = sendmail(config, "alice", stdin=b"Subject: x\n\ny\n")
        assert result.returncode == 0, result.stderr
        assert len(spool_entries(tmp_path)) == 1
        assert sleeper.poll() is None, "a foreign process was signalled"
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait(5)


def test_q_without_a_server(tmp_path: Path):
    config, _ = _stopped_config(tmp_path)
    assert sendmail(config, "alice", stdin=b"Subject: x\n\ny\n").returncode == 0
    result = sendmail(config, "-q")
    assert result.returncode == 0, result.stderr
    assert "server not running" in result.stdout


# -- (c) errors: one line, a sysexits code, never a traceback ---------------------------


@pytest.mark.parametrize("args, expected", [
    (["-Z", "alice"], "unknown option -Z"),
    (["-f"], "option -f requires an argument"),
    (["-bd"], "-bd is not supported"),
    (["-bx"], "unknown mode -bx"),
    (["-f", "bad address@@x", "alice"], "bad sender address"),
    ([], "no recipients"),
    (["-t"], "no recipient addresses found"),
])
def test_usage_errors_exit_64(tmp_path: Path, args: list[str], expected: str):
    config, _ = _stopped_config(tmp_path)
    result = sendmail(config, *args, stdin=b"Subject: x\n\ny\n")
    assert result.returncode == 64, result.stderr
    assert expected in one_line_error(result)
    assert not spool_entries(tmp_path)


def test_bad_recipient_syntax_is_67(tmp_path: Path):
    config, _ = _stopped_config(tmp_path)
    result = sendmail(config, "not an address", stdin=b"Subject: x\n\ny\n")
    assert result.returncode == 67
    assert "5.1.3" in one_line_error(result)


def test_nul_byte_and_missing_config(tmp_path: Path):
    config, _ = _stopped_config(tmp_path)
    nul = sendmail(config, "alice", stdin=b"Subject: x\n\na\x00b\n")
    assert nul.returncode == 65 and "NUL" in one_line_error(nul)
    missing = sendmail(tmp_path / "nope.toml", "alice", stdin=b"x\n")
    assert missing.returncode == 78
    assert "config error" in one_line_error(missing)
    assert not spool_entries(tmp_path)


def test_unwritable_spool_is_a_temporary_failure(tmp_path: Path):
    """Issue 8, defect 9: a spool that cannot be written is temporary (75, the caller keeps
    the message and retries), not 73 or 77, which callers take as permanent."""
    config, _ = _stopped_config(tmp_path)
    (tmp_path / "spool").write_text("a file where the spool folder should be\n")
    result = sendmail(config, "alice", stdin=b"Subject: x\n\ny\n")
    assert result.returncode == 75, result.stderr
    assert "cannot write to the spool" in one_line_error(result)


def test_an_error_nobody_classified_is_temporary(tmp_path: Path):
    """Issue 8, defect 9: an internal error (here: no standard input at all, so Python has
    no sys.stdin) exits 75 EX_TEMPFAIL with one line, not 70 EX_SOFTWARE."""
    config, _ = _stopped_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONOMAIL_CONFIG": str(config)}
    proc = subprocess.run([sys.executable, "-m", "monomail.sendmail", "alice"], capture_output=True, text=True,
                          timeout=25, env=env, cwd=tmp_path, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 75, proc.stderr
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr))
    assert "try again later" in line
    assert not spool_entries(tmp_path)


@pytest.mark.parametrize("command", [["-m", "monomail", "sendmail", "--help"], ["-m", "monomail.sendmail", "--help"],
                                     ["-m", "monomail.sendmail", "-t", "--help"]])
def test_sendmail_help(tmp_path: Path, command: list[str]):
    """Issue 8, defect 15: ``monomail --help`` sends people to ``monomail sendmail --help``,
    which said "unknown option --" and exited 64. It prints the usage and exits 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONOMAIL_CONFIG": str(tmp_path / "none.toml")}
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=25, env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: monomail sendmail ")
    assert "-bs" in proc.stdout and "--help" in proc.stdout and proc.stderr == ""
    top = subprocess.run([sys.executable, "-m", "monomail", "--help"], capture_output=True, text=True, timeout=25,
                         env=env, cwd=tmp_path)
    assert "monomail sendmail --help" in " ".join(top.stdout.split())


# -- the pure parts, without processes --------------------------------------------------


def test_parse_args_like_getopt():
    from monomail.errors import UsageError
    from monomail.sendmail.options import parse_args

    opts = parse_args(["-ti", "-fme@x.test", "-F", "Me", "-oem", "-B", "8BITMIME", "-odi", "a", "-b"])
    assert (opts.extract, opts.ignore_dots, opts.sender, opts.full_name) == (True, True, "me@x.test", "Me")
    assert opts.recipients == ["a", "-b"]  # options end at the first recipient
    assert parse_args(["-oi", "--", "-weird"]).recipients == ["-weird"]
    assert parse_args(["-bs"]).mode == "s" and parse_args(["-q30m"]).mode == "q"
    assert parse_args(["-r", ""]).sender == ""
    for bad in (["-Z"], ["-F"], ["-o"], ["-bd"]):
        with pytest.raises(UsageError):
            parse_args(bad)


def test_prepare_completes_headers_and_drops_bcc():
    from monomail.sendmail.compose import normalize, prepare

    raw = normalize(b"From MAILER-DAEMON Sat Nov 28 10:00:00 2026\r\nTo: a, \"B\" <b@x.test>\r\n"
                    b"Cc: c@x.test\r\nBcc: d@x.test,\r\n e@x.test\r\nSubject: s\r\n\r\nbody\r")
    p = prepare(raw, from_address="me@example.test", full_name="Me Myself", hostname="h.test", extract=True,
                now=0)
    assert p.recipients == ("a", "b@x.test", "c@x.test", "d@x.test", "e@x.test")
    head, body = p.data.split(b"\n\n", 1)
    assert body == b"body\n"
    assert b"Bcc" not in head and b"e@x.test" not in head
    assert b"\nFrom: Me Myself <me@example.test>\n" in head
    assert b"\nDate: " in head and b"\nMessage-ID: <" in head and b"@h.test>" in head
    resent = prepare(b"Resent-To: r@x.test\nTo: t@x.test\n\nx\n", from_address="m@x", full_name="",
                     hostname="h", extract=True)
    assert resent.recipients == ("r@x.test",)


def test_message_without_headers_and_long_lines():
    from monomail.message import split_header
    from monomail.sendmail.compose import prepare, wrap_long_lines

    assert split_header(b"not a header line\nSubject: x\n") == (b"", b"not a header line\nSubject: x\n")
    p = prepare(b"plain output\n", from_address="m@x", full_name="", hostname="h", extract=False)
    assert p.data.endswith(b"\n\nplain output\n")
    text = "é".encode() * 700  # 1,400 octets, two per character
    wrapped = wrap_long_lines(b"a" + text + b"\n")
    assert all(len(line) <= 998 for line in wrapped.split(b"\n"))
    assert wrapped.replace(b"\n ", b"") == b"a" + text + b"\n"
    wrapped.decode("utf-8")  # never cut inside a character


def test_exit_code_of_refusals():
    from monomail.sendmail.handover import exit_code

    assert exit_code({"a": "550 5.1.1 No such user here"}) == 67
    assert exit_code({"a": "553 5.1.3 Bad address syntax"}) == 67
    assert exit_code({"a": "550 mailbox unavailable"}) == 67
    assert exit_code({"a": "554 5.6.0 Message contains a bare CR or LF"}) == 69
