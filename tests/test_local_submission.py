"""Issue 11, local submission by any user: ``sendmail``, ``mailq`` and ``newaliases`` run
as real throwaway accounts (``unix_account``, ``as_user``) against a real ``monomail
serve`` (running or stopped), mail read back with ``mailbox``.

The config and spool of these tests live in a 0755 folder of their own (pytest's
tmp_path is root's 0700, which no account could traverse), removed afterwards.
"""

from __future__ import annotations

import email
import json
import mailbox
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, ProcessServer, free_port, wait_until, write_config
from unixaccounts import as_user

from monomail import maildrop, policy
from monomail.config import load
from monomail.sendmail.compose import qualify_field
from monomail.sendmail.options import parse_args
from monomail.transaction import Transaction


@dataclass
class Site:
    """A config and spool any account can reach, a server for it, and accounts."""

    base: Path
    config: Path
    port: int
    user: pwd.struct_passwd  # an unprivileged account, also a TOML user of the same name
    other: pwd.struct_passwd  # a second account (no TOML user)
    servers: list[ProcessServer] = field(default_factory=list)

    @property
    def spool(self) -> Path:
        return self.base / "spool"

    @property
    def drop(self) -> Path:
        return self.spool / "public" / "maildrop"

    def start(self) -> ProcessServer:
        server = ProcessServer(self.config, self.port).start()
        self.servers.append(server)
        wait_until(lambda: (self.spool / "public" / "monomail.pid").exists())  # written after the sockets
        return server

    def stop(self, server: ProcessServer) -> None:
        assert server.terminate() == 0, server.log.read_text()[-2000:]

    def address(self, entry: pwd.struct_passwd) -> str:
        return f"{entry.pw_name}@example.test"

    def sendmail(self, entry: pwd.struct_passwd, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        return self.run(entry, "-m", "monomail.sendmail", *args, stdin=stdin)

    def run(self, entry: pwd.struct_passwd, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        done = as_user(entry, [sys.executable, *argv], input=stdin, capture_output=True,
                       env={"PYTHONPATH": str(ROOT), "MONOMAIL_CONFIG": str(self.config)})
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "replace"),
                                           done.stderr.decode("utf-8", "replace"))

    def maildir(self, name: str) -> list[email.message.Message]:
        folder = self.base / "mail" / name
        if not (folder / "new").is_dir():
            return []
        box = mailbox.Maildir(folder, factory=None, create=False)
        return [email.message_from_bytes(box.get_bytes(k)) for k in box.iterkeys()]

    def drop_files(self) -> list[Path]:
        return sorted(self.drop.iterdir()) if self.drop.is_dir() else []


@pytest.fixture
def site(unix_account: Any) -> Iterator[Site]:
    base = Path(tempfile.mkdtemp(prefix="monomail-local-"))
    base.chmod(0o755)
    user, other = unix_account(), unix_account()
    port = free_port()
    config = write_config(base, server={"listen": [f"127.0.0.1:{port}"], "spool_dir": "spool"},
                          users={user.pw_name: {}}, queue={"retry": ["1h"]}, local={"lock_timeout": "0.2s"})
    config.chmod(0o644)
    s = Site(base, config, port, user, other)
    try:
        yield s
    finally:
        for server in s.servers:
            if server.proc and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(5)
        shutil.rmtree(base, ignore_errors=True)


CRON = b"To: alice\nSubject: nightly\n\nbackup done\n"


# -- sendmail -t as an account -----------------------------------------------------------


def test_sendmail_t_as_an_account_delivers_through_the_running_server(site: Site):
    site.start()
    result = site.sendmail(site.user, "-t", "-i", stdin=CRON)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: site.maildir("alice"))
    [msg] = site.maildir("alice")
    assert msg["Return-Path"] == f"<{site.address(site.user)}>"
    assert site.address(site.user) in msg["From"]
    assert msg["To"] == "alice@example.test"  # qualified with the primary domain
    [received] = [r for r in msg.get_all("Received") if "local submission" in r]
    assert f"from {site.user.pw_name} (uid {site.user.pw_uid})" in received
    assert not site.drop_files()


def test_untrusted_f_is_ignored_and_refused_on_the_socket(site: Site):
    site.start()
    result = site.sendmail(site.user, "-f", "boss@example.test", "-v", "alice", stdin=b"Subject: forged\n\nx\n")
    assert result.returncode == 0, result.stderr
    assert "-f boss@example.test ignored" in result.stderr
    wait_until(lambda: site.maildir("alice"))
    [msg] = site.maildir("alice")
    assert msg["Return-Path"] == f"<{site.address(site.user)}>"

    # Raw SMTP on the socket: the kernel's uid decides, whatever the client says.
    script = f"""
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect({str(site.spool / "public" / "submit")!r})
f = s.makefile("rb")
def say(line):
    s.sendall(line.encode() + b"\\r\\n")
    reply = f.readline()
    while reply[3:4] == b"-":
        reply = f.readline()
    print(reply.decode().strip())
print(f.readline().decode().strip())
for line in ["EHLO me", "MAIL FROM:<boss@example.test>", "MAIL FROM:<{site.address(site.user)}>", "RSET",
             "MAIL FROM:<>", "RSET", "MAIL FROM:<{site.user.pw_name}>", "RSET",
             "MAIL FROM:<{site.address(site.other)}>", "QUIT"]:
    say(line)
"""
    out = site.run(site.user, "-c", script)
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    assert replies[0].startswith("220 ")
    assert replies[2].startswith("553 5.7.1"), replies  # somebody else's address
    assert replies[3].startswith("250 "), replies  # its own
    assert replies[5].startswith("250 "), replies  # <>
    assert replies[7].startswith("250 "), replies  # its bare login: qualified, its own
    assert replies[9].startswith("553 5.7.1"), replies  # another account's


def test_root_may_set_the_sender(site: Site):
    """Root (trusted) keeps its -f on the socket, as before."""
    site.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONOMAIL_CONFIG": str(site.config)}
    done = subprocess.run([sys.executable, "-m", "monomail.sendmail", "-f", "boss@example.test", "alice"],
                          input=b"Subject: root\n\nx\n", capture_output=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: site.maildir("alice"))
    assert site.maildir("alice")[0]["Return-Path"] == "<boss@example.test>"


# -- the server stopped: the drop folder ---------------------------------------------


def test_while_stopped_it_is_dropped_and_delivered_at_the_next_start(site: Site):
    site.stop(site.start())  # the server made its public corner once
    assert not (site.spool / "public" / "monomail.pid").exists()
    result = site.sendmail(site.user, "-t", "-i", "-f", "boss@example.test", stdin=CRON)
    assert result.returncode == 0, result.stderr
    [drop] = site.drop_files()
    st = drop.lstat()
    assert st.st_uid == site.user.pw_uid and stat.S_IMODE(st.st_mode) == 0o444
    assert not site.maildir("alice")

    # Another account cannot list the drop folder (so it never learns a name to read), nor
    # remove, replace or change the file even when told its name.
    probe = f"""
import os, json
out = {{}}
for name, act in [("list", lambda: os.listdir({str(site.drop)!r})),
                  ("write", lambda: open({str(drop)!r}, "r+b")),
                  ("remove", lambda: os.unlink({str(drop)!r})),
                  ("create", lambda: open({str(site.drop / "x")!r}, "xb").close()),
                  ("replace", lambda: os.rename({str(site.drop / "x")!r}, {str(drop)!r}))]:
    try:
        act(); out[name] = "done"
    except PermissionError:
        out[name] = "refused"
os.unlink({str(site.drop / "x")!r})
print(json.dumps(out))
"""
    out = site.run(site.other, "-c", probe)
    assert json.loads(out.stdout) == {"list": "refused", "write": "refused", "remove": "refused",
                                      "replace": "refused", "create": "done"}, out.stderr

    site.start()
    wait_until(lambda: site.maildir("alice"))
    [msg] = site.maildir("alice")
    assert msg["Return-Path"] == f"<{site.address(site.user)}>"  # the file's owner, not -f
    assert msg["Subject"] == "nightly"
    assert not site.drop_files()


def test_a_drop_file_names_its_sender_in_vain_and_bad_files_are_set_aside(site: Site):
    """Written by hand (not through sendmail): the owner's uid decides the sender; a
    symlink, a hard link and garbage are moved aside with a log line; the server goes on."""
    site.stop(site.start())
    script = f"""
import os
from pathlib import Path
from monomail import maildrop
drop = Path({str(site.drop)!r})
maildrop.deposit(drop, "boss@example.test", ["alice@example.test"], b"Subject: by hand\\n\\nx\\n")
(drop / "garbage").write_bytes(b"not a drop file\\n")
os.symlink("/etc/passwd", drop / "link")
maildrop.deposit(Path(os.environ["HOME"]), "", ["alice@example.test"], b"Subject: linked\\n\\nx\\n")
[made] = [p for p in Path(os.environ["HOME"]).iterdir() if len(p.name) == 32]
os.link(made, drop / "hardlink")
"""
    out = site.run(site.user, "-c", script)
    assert out.returncode == 0, out.stderr
    server = site.start()
    wait_until(lambda: site.maildir("alice") and not site.drop_files())
    [msg] = site.maildir("alice")
    assert msg["Subject"] == "by hand" and msg["Return-Path"] == f"<{site.address(site.user)}>"
    log = server.log.read_text()
    for name, why in [("garbage", "envelope line is not JSON"), ("link", "a symbolic link"),
                      ("hardlink", "2 hard links")]:
        assert f"drop file {name} (uid " in log and why in log, log
    assert sorted(p.name for p in (site.spool / "maildrop.bad").iterdir()) == ["garbage", "hardlink", "link"]
    assert server.proc is not None and server.proc.poll() is None


def test_after_the_drop_to_server_user_the_public_corner_is_that_users(site: Site):
    """Started as root with ``server.user`` (the lead's privilege drop): the public corner
    is made by the account the server became; users submit through it; root, whose files
    must not land in that account's spool, uses the drop folder while it is stopped."""
    text = site.config.read_text().replace(f'user = "{pwd.getpwuid(os.geteuid()).pw_name}"',
                                           f'user = "{site.other.pw_name}"')
    site.config.write_text(text)
    server = site.start()
    public = site.spool / "public"
    for path, mode in ((site.spool, 0o711), (public, 0o755), (site.drop, 0o1733),
                       (public / "monomail.pid", 0o644), (public / "submit", 0o666)):
        st = path.lstat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (site.other.pw_uid, mode), path
    assert f"uid {site.other.pw_uid}" in (public / "monomail.pid").read_text().splitlines()
    result = site.sendmail(site.user, "-f", f"{site.other.pw_name}@example.test", "alice", stdin=b"Subject: a\n\nx\n")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: site.maildir("alice"))
    assert site.maildir("alice")[0]["Return-Path"] == f"<{site.address(site.user)}>"
    # the server's own user is trusted
    result = site.sendmail(site.other, "-f", "boss@example.test", "carol", stdin=b"Subject: c\n\nx\n")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: site.maildir("carol"))
    assert site.maildir("carol")[0]["Return-Path"] == "<boss@example.test>"

    site.stop(server)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONOMAIL_CONFIG": str(site.config)}
    done = subprocess.run([sys.executable, "-m", "monomail.sendmail", "-f", "root-job@example.test", "bob"],
                          input=b"Subject: from root\n\nx\n", capture_output=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    [drop] = site.drop_files()
    assert drop.lstat().st_uid == 0
    assert {p.lstat().st_uid for p in site.spool.iterdir()} == {site.other.pw_uid}
    again = site.start()  # (it would refuse a spool holding root's files)
    try:
        # (the mbox is created empty, then appended: wait for the message, not the file)
        wait_until(lambda: (site.base / "mail" / "bob").exists() and len(mailbox.mbox(site.base / "mail" / "bob")) == 1
                   and not site.drop_files())
    except AssertionError:
        raise AssertionError(again.log.read_text()[-3000:]) from None
    [msg] = mailbox.mbox(site.base / "mail" / "bob")
    assert msg["Return-Path"] == "<root-job@example.test>"  # root is trusted


# -- the spool is the server's ---------------------------------------------------------


def _deferred_entry(site: Site) -> str:
    """A message for bob that stays queued (his mbox is dot-locked by somebody else)."""
    (site.base / "mail").mkdir(exist_ok=True)
    (site.base / "mail" / "bob.lock").write_text("0\n")
    result = site.sendmail(site.user, "bob", stdin=b"Subject: deferred\n\nx\n")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: list(site.spool.glob("*.json")))
    [entry] = site.spool.glob("*.json")
    return entry.stem


def test_the_account_cannot_write_the_spool_and_mailq_works_for_it(site: Site):
    server = site.start()
    qid = _deferred_entry(site)
    files = [p for p in site.spool.iterdir() if p.is_file()] + [site.spool / "public" / "monomail.pid"]
    probe = f"""
import os, json
out = {{}}
for path in {[str(p) for p in files]!r}:
    try:
        open(path, "r+b").close(); out[path] = "writable"
    except PermissionError:
        out[path] = "refused"
for name, act in [("create", lambda: open({str(site.spool / "x.json")!r}, "xb")),
                  ("list", lambda: os.listdir({str(site.spool)!r})),
                  ("state", lambda: open({str(site.spool / "public" / "monomail.pid")!r}).read())]:
    try:
        act(); out[name] = "done"
    except PermissionError:
        out[name] = "refused"
print(json.dumps(out))
"""
    out = json.loads(site.run(site.user, "-c", probe).stdout)
    assert {out[str(p)] for p in files} == {"refused"}, out
    assert (out["create"], out["list"], out["state"]) == ("refused", "refused", "done")

    for argv in (["-m", "monomail.sendmail", "-bp"], ["-m", "monomail", "queue", "list", "-c", str(site.config)]):
        listed = site.run(site.user, *argv)
        assert listed.returncode == 0, listed.stderr
        assert qid in listed.stdout and "<bob@example.test>" in listed.stdout, listed.stdout
        assert f"from <{site.address(site.user)}>" in listed.stdout

    site.stop(server)
    down = site.sendmail(site.user, "-bp")
    assert down.returncode == 69, down.stderr
    assert "mail system is down" in down.stderr and len(down.stderr.strip().splitlines()) == 1


# -- cron: -oem ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["-t", "argument"])
def test_cron_oem_to_an_unknown_user_bounces_to_the_sender(site: Site, how: str):
    """Vixie cron: ``-FCronDaemon -odi -oem -oi -t``; Debian's: ``-FCronDaemon -i
    -B8BITMIME -oem -oi`` with the recipient given. The unknown user is not refused (the
    mail would be lost): the account gets a bounce, and cron sees 0."""
    site.start()
    message = b"To: nosuchuser\nSubject: Cron <me@host> job\n\noutput\n"
    args = ["-FCronDaemon", "-odi", "-oem", "-oi", "-t"] if how == "-t" else \
        ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-oi", "nosuchuser"]
    result = site.sendmail(site.user, *args, stdin=message)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: site.maildir(site.user.pw_name))
    [bounce] = site.maildir(site.user.pw_name)
    assert bounce["Return-Path"] == "<>"
    assert bounce.get_content_type() == "multipart/report"
    text = bounce.as_string()
    assert "nosuchuser@example.test" in text and "5.1.1" in text and "Cron <me@host> job" in text

    # without -oem: refused, as before (67)
    plain = site.sendmail(site.user, "nosuchuser", stdin=b"Subject: x\n\ny\n")
    assert plain.returncode == 67 and "5.1.1" in plain.stderr


def test_cron_oem_while_stopped_bounces_at_start(site: Site):
    site.stop(site.start())
    result = site.sendmail(site.user, "-oem", "-oi", "-t", stdin=b"To: nosuchuser\nSubject: c\n\no\n")
    assert result.returncode == 0, result.stderr
    site.start()
    wait_until(lambda: site.maildir(site.user.pw_name))
    assert site.maildir(site.user.pw_name)[0].get_content_type() == "multipart/report"


# -- newaliases --------------------------------------------------------------------------


def test_newaliases_checks_the_config(site: Site):
    for argv in (["-m", "monomail.sendmail", "-bi"],
                 ["-c", "import sys; sys.argv[0] = 'newaliases'; from monomail.sendmail import main; "
                        "sys.exit(main())"]):
        done = site.run(site.user, *argv)
        assert done.returncode == 0, done.stderr
        assert "reads its aliases from it" in done.stdout
    site.config.write_text("[server\n")
    bad = site.run(site.user, "-m", "monomail.sendmail", "-bi")
    assert bad.returncode == 78 and "config error" in bad.stderr


# -- the pieces, without accounts --------------------------------------------------------


def test_drop_files_are_checked_before_they_are_read(tmp_path: Path):
    folder = tmp_path / "drop"
    folder.mkdir()
    good = maildrop.deposit(folder, "a@example.test", ["b@example.test"], b"Subject: s\n\nbody\n")
    assert len(good.name) == 32 and stat.S_IMODE(good.stat().st_mode) == 0o444
    (folder / "big").write_bytes(b'{"v": 1, "sender": "", "recipients": ["b@x.test"]}\n' + b"x" * 5000)
    (folder / "nobody").write_bytes(b'{"v": 1, "sender": "", "recipients": []}\nx\n')
    (folder / "bare").write_bytes(b'{"v": 1, "sender": "", "recipients": ["bob"]}\nx\n')
    os.mkfifo(folder / "fifo")
    old = folder / ".half-written"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fresh = folder / ".being-written"
    fresh.write_bytes(b"x")
    found = {item.path.name: item for item in maildrop.collect(folder, limit=4096)}
    ok = found.pop(good.name)
    assert isinstance(ok, maildrop.Dropped)
    assert (ok.sender, ok.recipients, ok.data, ok.owner) == ("a@example.test", ("b@example.test",),
                                                              b"Subject: s\n\nbody\n", os.getuid())
    reasons = {name: item.reason for name, item in found.items() if isinstance(item, maildrop.Bad)}
    assert reasons.keys() == {"big", "nobody", "bare", "fifo"}, found
    assert "larger than" in reasons["big"] and "not a regular file" in reasons["fifo"]
    assert not old.exists() and fresh.exists()  # a dead writer's temp goes; a live one's stays


def test_address_fields_are_qualified_in_place():
    assert qualify_field(b"From: root (Cron Daemon)\n", "ex.test") == b"From: root@ex.test (Cron Daemon)\n"
    assert (qualify_field(b'To: a, "B, b" <bb>, c@x.test\n', "ex.test")
            == b'To: a@ex.test, "B, b" <bb@ex.test>, c@x.test\n')
    assert qualify_field(b"To: undisclosed-recipients:;\n", "ex.test") == b"To: undisclosed-recipients:;\n"
    assert qualify_field(b"Cc: x@y.test (Y)\n", "ex.test") == b"Cc: x@y.test (Y)\n"


def test_oe_flags():
    assert parse_args(["-oem", "x"]).errors_mailed and parse_args(["-oee", "x"]).errors_mailed
    assert not parse_args(["-oep", "x"]).errors_mailed and not parse_args(["x"]).errors_mailed
    assert parse_args(["-bi"]).mode == "i"


def test_local_sender_rule(tmp_path: Path):
    config = load(write_config(tmp_path, local={"trusted_users": ["www-data"]}))
    assert policy.local_sender("me@example.test", "me", False, config)
    assert policy.local_sender("", "me", False, config)
    assert not policy.local_sender("you@example.test", "me", False, config)
    assert policy.local_sender("you@example.test", "me", True, config)
    assert policy.trusted_user(0, "root", config, 1234) and policy.trusted_user(1234, "mm", config, 1234)
    assert policy.trusted_user(33, "www-data", config, None) and not policy.trusted_user(1000, "me", config, None)
    core = Transaction(config, lambda a, s: None, local_sender=lambda s: policy.local_sender(s, "me", False, config))
    core.receive(b"EHLO x\r\n")
    assert str(core.receive(b"MAIL FROM:<you@example.test>\r\n").replies[0]).startswith("553 5.7.1")
    assert str(core.receive(b"MAIL FROM:<me>\r\n").replies[0]).startswith("250")


def test_the_state_file_says_where_the_server_is(serve: Any):
    server = serve()
    public = server.config.server.spool_dir / "public"
    lines = (public / "monomail.pid").read_text().splitlines()
    assert lines[0] == str(os.getpid())
    assert f"socket {public / 'submit'}" in lines and f"showq {public / 'showq'}" in lines
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(public / "showq"))
        assert s.makefile("rb").read() == b"queue is empty\n"
