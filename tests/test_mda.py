"""``monomail deliver`` as a mail delivery agent: run as a subprocess with a message on
stdin, and for real as Postfix's ``mailbox_command`` behind a throwaway Postfix on
loopback. Mailboxes are read back with stdlib ``mailbox``."""

from __future__ import annotations

import contextlib
import email
import mailbox
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from conftest import ROOT, base_config, free_port, write_config

MESSAGE = (b"From someone@remote.test Sat Nov 28 12:00:00 2026\r\n"
           b"Return-Path: <stale@remote.test>\r\n"
           b"Subject: via the MDA\r\n"
           b"\r\n"
           b"body line\r\n"
           b"From the start of a line\r\n")


def mda(config: Path, *args: str, stdin: bytes = MESSAGE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "monomail.mda", "-c", str(config), *args], input=stdin,
                          capture_output=True, timeout=25, env=env, cwd=config.parent)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("monomail deliver: ")
    return lines[0]


def test_delivers_into_a_maildir(tmp_path: Path):
    config = write_config(tmp_path)
    result = mda(config, "-u", "alice", "-f", "sender@remote.test")
    assert result.returncode == 0, result.stderr
    box = mailbox.Maildir(tmp_path / "mail" / "alice", factory=None, create=False)
    [raw] = [box.get_bytes(k) for k in box.iterkeys()]
    msg = email.message_from_bytes(raw)
    assert msg.get_all("Return-Path") == ["<sender@remote.test>"]  # ours only; the stale one dropped
    assert msg["Delivered-To"] == "alice@example.test"
    assert msg["Subject"] == "via the MDA"
    assert not raw.startswith(b"From ") and b"\r" not in raw
    assert raw.endswith(b"\n\nbody line\nFrom the start of a line\n")


def test_delivers_into_an_mbox_with_the_from_line_sender(tmp_path: Path):
    config = write_config(tmp_path)
    result = mda(config, "-d", "bob", "-a", "bob+news@example.test")
    assert result.returncode == 0, result.stderr
    [msg] = list(mailbox.mbox(tmp_path / "mail" / "bob", create=False))
    assert msg["Return-Path"] == "<someone@remote.test>"  # from the leading From_ line
    assert msg["Delivered-To"] == "bob+news@example.test"  # -a names the same user: kept
    assert msg.get_payload() == "body line\n>From the start of a line\n"  # as stored: mboxrd-quoted


def test_a_names_another_user_is_ignored(tmp_path: Path):
    config = write_config(tmp_path)
    result = mda(config, "-u", "alice", "-a", "bob@example.test", "-f", "")
    assert result.returncode == 0, result.stderr
    box = mailbox.Maildir(tmp_path / "mail" / "alice", factory=None, create=False)
    [raw] = [box.get_bytes(k) for k in box.iterkeys()]
    msg = email.message_from_bytes(raw)
    assert msg["Delivered-To"] == "alice@example.test" and msg["Return-Path"] == "<>"
    assert not (tmp_path / "mail" / "bob").exists()


def test_unknown_user_is_67(tmp_path: Path):
    config = write_config(tmp_path)
    result = mda(config, "-u", "nobody")
    assert result.returncode == 67
    assert "5.1.1" in one_line(result)
    assert not (tmp_path / "mail").exists() or not any((tmp_path / "mail").iterdir())


def test_locked_mbox_is_75_and_nothing_is_written(tmp_path: Path):
    config = write_config(tmp_path, local={"lock_timeout": "0.3s"})
    folder = tmp_path / "mail"
    folder.mkdir()
    (folder / "bob").write_bytes(b"")
    (folder / "bob.lock").write_text("0\n")  # another program's dot-lock (no pid: honoured)
    started = time.monotonic()
    result = mda(config, "-u", "bob")
    assert result.returncode == 75
    assert "4.2.0" in one_line(result)
    assert time.monotonic() - started < 10
    assert (folder / "bob").read_bytes() == b""
    assert (folder / "bob.lock").read_text() == "0\n"


@pytest.mark.parametrize("args", [[], ["-u"], ["-u", "alice", "--bogus"]])
def test_usage_errors_are_temporary(tmp_path: Path, args: list[str]):
    """A typo in the MTA's command line must not bounce mail: 75, the MTA retries."""
    config = write_config(tmp_path)
    result = mda(config, *args)
    assert result.returncode == 75
    assert "usage error" in one_line(result)


def test_bad_config_is_temporary(tmp_path: Path):
    result = mda(tmp_path / "missing.toml", "-u", "alice")
    assert result.returncode == 75
    assert "config error" in one_line(result)


# -- Postfix hands mail to monomail deliver ------------------------------------------------

POSTFIX = "/usr/sbin/postfix"
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
local     unix - n n - - local
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class PostfixInstance:
    base: Path
    etc: Path
    queue: Path
    port: int
    user: str
    mail_dir: Path

    @property
    def maillog(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "maillog").read_text(errors="replace")
        return ""

    def master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        return None


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _instance_pids(inst: PostfixInstance) -> list[int]:
    """This instance's processes: the master from its pid file, and every process whose
    working directory is inside the instance (Postfix daemons and the commands they run
    work in queue_directory)."""
    pids = set()
    master = inst.master_pid()
    if master and _alive(master):
        pids.add(master)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cwd = Path(os.readlink(entry / "cwd"))
            if (cwd == inst.base or inst.base in cwd.parents) and _alive(int(entry.name)):
                pids.add(int(entry.name))
    pids.discard(os.getpid())
    return sorted(pids)


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that process ``pid`` holds."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    addr, port = cols[1].split(":")
                    ip = socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if table == "tcp" else addr
                    found.append(f"{ip}:{int(port, 16)}")
    return found


def _python_for(uid: int, gid: int, cwd: Path) -> tuple[str, str] | None:
    """An interpreter (and PYTHONPATH) with which an unprivileged user can import
    monomail: this one if it is reachable, else the system's python3 of the same version."""
    pythonpath = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    probe = ("import sys, monomail.mda, aiosmtplib, dns.resolver; "
             f"assert sys.version_info[:2] == {tuple(sys.version_info[:2])}")
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        try:
            ok = subprocess.run([python, "-c", probe], user=uid, group=gid, extra_groups=[], cwd=cwd,
                                env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"},
                                capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return python, pythonpath
    return None


@pytest.fixture
def postfix() -> Iterator[PostfixInstance]:
    """A throwaway Postfix listening on 127.0.0.1 only, with its own config, queue and
    data directories, and a throwaway Unix user whose mail goes to `monomail deliver`."""
    if os.geteuid() != 0:
        pytest.skip("the Postfix integration test needs root (Postfix, useradd)")
    if not (os.access(POSTFIX, os.X_OK) and shutil.which("postconf") and Path("/usr/lib/postfix/sbin/master").exists()):
        pytest.skip("Postfix is not installed")
    if not (shutil.which("useradd") and shutil.which("userdel")):
        pytest.skip("useradd/userdel not available")
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        pytest.skip("no 'postfix' system user (Postfix is not set up)")

    base = Path(tempfile.mkdtemp(prefix="monomail-pf-"))
    base.chmod(0o755)
    user = f"mmpf{os.getpid() % 100000}"
    created_user = False
    inst: PostfixInstance | None = None
    try:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            pytest.skip(f"user {user} already exists")
        home = base / "home"
        home.mkdir()
        subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/usr/sbin/nologin", "-U", user],
                       check=True, capture_output=True, timeout=20)
        created_user = True
        pw = pwd.getpwnam(user)
        os.chown(home, pw.pw_uid, pw.pw_gid)

        # monomail's side: a config the user can read, mail and spool folders it can write.
        mm = base / "monomail"
        mm.mkdir(mode=0o755)
        mm.chmod(0o755)
        cfg = base_config(users={user: {}, "alice": {}}, aliases={"postmaster": ["alice"]})
        (mm / "monomail.toml").write_text(tomli_w.dumps(cfg))
        (mm / "monomail.toml").chmod(0o644)
        for sub in ("mail", "spool"):
            (mm / sub).mkdir()
            os.chown(mm / sub, pw.pw_uid, pw.pw_gid)
        found = _python_for(pw.pw_uid, pw.pw_gid, home)
        if found is None:
            pytest.skip("no Python interpreter that an unprivileged user can run monomail with")
        python, pythonpath = found

        # Postfix's side.
        etc, queue, data = base / "etc", base / "queue", base / "data"
        etc.mkdir()
        queue.mkdir(mode=0o755)  # Postfix makes its subfolders, owned by mail_owner
        port = free_port()
        command = (f"/usr/bin/env PYTHONPATH={pythonpath} PYTHONDONTWRITEBYTECODE=1 {python} -m monomail.mda "
                   f"-c {mm / 'monomail.toml'} -u \"$USER\" -f \"$SENDER\" -a \"$RECIPIENT\"")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(queue),
            "data_directory": str(data),
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "pf.localhost.test",
            "mydomain": "localhost.test",
            "myorigin": "localhost.test",
            "mydestination": "localhost.test",
            "inet_interfaces": "127.0.0.1",  # loopback only
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": "",
            "default_transport": "error:no mail leaves this test instance",
            "relay_transport": "error:no mail leaves this test instance",
            "biff": "no",
            "maillog_file": str(base / "maillog"),
            "maillog_file_prefixes": str(base),
            "mailbox_command": command,
            "mailbox_size_limit": "0",
            "queue_run_delay": "1s",  # retry deferred mail soon (a test has no time to wait)
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (etc / "master.cf").write_text(MASTER_CF.format(port=port))
        check = subprocess.run(["postconf", "-c", str(etc), "-h", "inet_interfaces", "mailbox_command"],
                               capture_output=True, text=True, timeout=20)
        assert check.stdout.splitlines() == ["127.0.0.1", command], check.stdout + check.stderr
        inst = PostfixInstance(base, etc, queue, port, user, mm / "mail")

        started = subprocess.run([POSTFIX, "-c", str(etc), "start"], capture_output=True, text=True, timeout=20)
        if started.returncode != 0:
            pytest.skip(f"Postfix instance did not start: {started.stderr.strip() or inst.maillog[-500:]}")
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                pytest.skip(f"Postfix instance not listening within 5s: {inst.maillog[-500:]}")
            time.sleep(0.1)
        yield inst
    finally:
        if inst is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([POSTFIX, "-c", str(inst.etc), "stop"], capture_output=True, timeout=20)
            deadline = time.monotonic() + 5
            while _instance_pids(inst) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in _instance_pids(inst):  # leftovers, by id
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if created_user:
            subprocess.run(["userdel", user], capture_output=True, timeout=20)
        shutil.rmtree(base, ignore_errors=True)


def test_postfix_hands_mail_to_monomail_deliver(postfix: PostfixInstance):
    master = postfix.master_pid()
    assert master is not None
    # Nothing listens but on loopback.
    listening = _listening_addresses(master)
    assert listening == [f"127.0.0.1:{postfix.port}"], listening

    message = (f"From: Tester <tester@example.net>\r\nTo: {postfix.user}@localhost.test\r\n"
               f"Subject: through postfix\r\nMessage-ID: <pf-1@example.net>\r\n\r\n"
               f"handed over by local(8)\r\n").encode()
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as client:
        assert client.sendmail("tester@example.net", [f"{postfix.user}@localhost.test"], message) == {}

    folder = postfix.mail_dir / postfix.user
    deadline = time.monotonic() + 20
    while not (folder / "new").is_dir() or not any((folder / "new").iterdir()):
        if time.monotonic() > deadline:
            pytest.fail(f"not delivered by monomail within 20s; Postfix log:\n{postfix.maillog[-3000:]}")
        time.sleep(0.1)
    box = mailbox.Maildir(folder, factory=None, create=False)
    [key] = list(box.iterkeys())
    raw = box.get_bytes(key)
    msg = email.message_from_bytes(raw)
    assert msg["Subject"] == "through postfix"
    assert msg["Message-ID"] == "<pf-1@example.net>"
    assert msg.get_all("Return-Path") == ["<tester@example.net>"]  # one, ours (Postfix's dropped)
    assert f"{postfix.user}@example.test" in msg.get_all("Delivered-To")  # monomail's
    assert f"{postfix.user}@localhost.test" in msg.get_all("Delivered-To")  # Postfix's, kept
    assert any("(Postfix) with ESMTP" in r for r in msg.get_all("Received"))
    assert raw.endswith(b"handed over by local(8)\n")
    # Written by the recipient's own Unix user, as local(8) runs mailbox_command.
    assert (folder / "new" / key).stat().st_uid == pwd.getpwnam(postfix.user).pw_uid
    deadline = time.monotonic() + 10
    while "status=sent (delivered to command" not in postfix.maillog and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "status=sent (delivered to command" in postfix.maillog


def test_postfix_keeps_the_mail_when_monomail_defers(postfix: PostfixInstance):
    """Exit 75 makes Postfix defer, not bounce: the mail waits in Postfix's queue and is
    delivered by monomail on the next try, once the mailbox is usable again."""
    blocker = postfix.mail_dir / postfix.user
    blocker.write_text("a file where the Maildir should be\n")  # root's: the user cannot fix it
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as client:
        client.sendmail("tester@example.net", [f"{postfix.user}@localhost.test"],
                        b"Subject: deferred then delivered\r\n\r\nbody\r\n")
    deadline = time.monotonic() + 20
    while "status=deferred" not in postfix.maillog:
        if time.monotonic() > deadline:
            pytest.fail(f"Postfix did not defer within 20s:\n{postfix.maillog[-3000:]}")
        time.sleep(0.1)
    deferred = next(line for line in postfix.maillog.splitlines() if "status=deferred" in line)
    assert "monomail deliver:" in deferred and "4.3.0" in deferred, deferred
    assert "bounced" not in postfix.maillog

    blocker.unlink()
    flush = subprocess.run(["/usr/sbin/postqueue", "-c", str(postfix.etc), "-f"], capture_output=True, text=True,
                           timeout=20)
    assert flush.returncode == 0, flush.stderr + postfix.maillog[-1000:]
    folder = postfix.mail_dir / postfix.user / "new"
    deadline = time.monotonic() + 20
    while not folder.is_dir() or not any(folder.iterdir()):
        if time.monotonic() > deadline:
            pytest.fail(f"not delivered on retry within 20s:\n{postfix.maillog[-3000:]}")
        time.sleep(0.1)
    box = mailbox.Maildir(folder.parent, factory=None, create=False)
    assert [email.message_from_bytes(box.get_bytes(k))["Subject"] for k in box.iterkeys()] == [
        "deferred then delivered"]
