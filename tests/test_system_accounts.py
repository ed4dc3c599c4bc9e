"""System accounts as local users (``local.system_accounts``): the mailbox in the mail spool,
``~/.forward`` and ``~/.procmailrc`` with the account's own rights (issue 11, items 1 and 2).

Real throwaway accounts (``unix_account``; the tests skip when not root), a real server,
smtplib as the client, mailboxes read back with the stdlib ``mailbox`` module and with the
real ``mail`` (bsd-mailx) and ``mutt`` run as the account.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import mailbox
import os
import pty
import select
import shutil
import signal
import smtplib
import stat
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, wait_until, write_config
from unixaccounts import as_user


@pytest.fixture
def spool() -> Iterator[Path]:
    """A private mail spool as Debian makes one: root:mail 2775, under a 0755 folder."""
    top = Path(tempfile.mkdtemp(prefix="monomail-spool-"))
    top.chmod(0o755)
    folder = top / "mail"
    folder.mkdir()
    os.chown(folder, 0, _mail_gid())
    folder.chmod(0o2775)
    yield folder
    shutil.rmtree(top, ignore_errors=True)


def _mail_gid() -> int:
    try:
        return grp.getgrnam("mail").gr_gid
    except KeyError:
        pytest.skip("no mail group here")


def accounts_server(serve: Any, spool: Path, **overrides: Any) -> Any:
    local = {"system_accounts": True, "mail_spool": str(spool), **overrides.pop("local", {})}
    return serve(local=local, **overrides)


def send(server: Any, rcpt: str, subject: str, body: str = "hello there") -> None:
    data = f"From: friend@outside.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("friend@outside.test", [rcpt], data) == {}


def rcpt_reply(server: Any, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        s.mail("friend@outside.test")
        return s.rcpt(rcpt)


def subjects(path: Path) -> list[str]:
    return [str(m["Subject"]) for m in mailbox.mbox(path)] if path.exists() else []


def wait_for_subjects(path: Path, count: int) -> list[str]:
    wait_until(lambda: len(subjects(path)) >= count)
    return subjects(path)


def read_with_mutt(entry: Any, path: Path, needle: bytes, timeout: float = 20) -> bytes:
    """Open ``path`` in mutt on a pty as the account, show the first message, and return the
    screen output once ``needle`` appears in it."""
    home = entry.pw_dir
    argv = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--",
            "mutt", "-n", "-F", "/dev/null", "-R", "-f", str(path),
            "-e", f"set folder={home} tmpdir={home} pager=builtin", "-e", "push <display-message>"]
    env = {"HOME": home, "USER": entry.pw_name, "LOGNAME": entry.pw_name, "TERM": "xterm",
           "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec mutt at once
        os.chdir(home)
        os.execvpe(argv[0], argv, env)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and needle not in out:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    return out


# -- acceptance 1: the mailbox in the spool, read by the account's own mail readers ------------


def test_mail_to_an_account_lands_in_its_spool_mbox_owned_by_it_and_its_readers_show_it(
        serve, spool, unix_account):
    entry = unix_account()
    server = accounts_server(serve, spool)
    send(server, f"{entry.pw_name}@example.test", "first words", body="the quick brown fox")
    path = spool / entry.pw_name
    assert wait_for_subjects(path, 1) == ["first words"]
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (entry.pw_uid, _mail_gid(), 0o660)
    message = next(iter(mailbox.mbox(path)))
    assert message["Delivered-To"] == f"{entry.pw_name}@example.test"
    assert message.get_from().startswith("friend@outside.test ")

    done = as_user(entry, ["mail", "-N", "-f", str(path)], input=b"p\nx\n", capture_output=True)
    assert done.returncode == 0, done.stderr
    assert b"the quick brown fox" in done.stdout and b"Subject: first words" in done.stdout

    screen = read_with_mutt(entry, path, b"the quick brown fox")
    assert b"the quick brown fox" in screen, screen[-2000:]

    send(server, f"{entry.pw_name}@example.test", "second words")  # appended, owner unchanged
    assert wait_for_subjects(path, 2) == ["first words", "second words"]
    assert path.stat().st_uid == entry.pw_uid


def test_the_real_default_spool_var_spool_mail(serve, unix_account):
    entry = unix_account()
    server = serve(local={"system_accounts": True})  # mail_spool: the default /var/spool/mail
    path = Path("/var/spool/mail") / entry.pw_name
    send(server, f"{entry.pw_name}@example.test", "to the system spool")
    assert wait_for_subjects(path, 1) == ["to the system spool"]
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (entry.pw_uid, _mail_gid(), 0o660)
    assert not Path(f"{path}.lock").exists()
    done = as_user(entry, ["mail", "-N", "-f", str(path)], input=b"p\nx\n", capture_output=True)
    assert b"Subject: to the system spool" in done.stdout


def test_a_mailbox_that_is_a_symlink_or_not_the_accounts_is_never_written(serve, spool, unix_account, caplog):
    caplog.set_level(logging.INFO, logger="monomail")
    victim = unix_account()
    attacker = unix_account()
    target = Path(victim.pw_dir) / "precious"
    target.write_text("keep me\n")
    (spool / attacker.pw_name).symlink_to(target)
    foreign = spool / victim.pw_name
    foreign.write_text("")
    os.chown(foreign, attacker.pw_uid, _mail_gid())  # a mailbox owned by another account
    server = accounts_server(serve, spool)
    send(server, f"{attacker.pw_name}@example.test", "via a link")
    send(server, f"{victim.pw_name}@example.test", "into a foreign box")
    wait_until(lambda: "symbolic link" in caplog.text and "not by its account" in caplog.text)
    assert target.read_text() == "keep me\n"
    assert foreign.read_text() == ""
    assert len(list(server.app.spool.ids())) == 2  # both kept for a retry, not lost


def test_concurrent_messages_share_locked_appends_and_all_land(serve, spool, unix_account):
    entry = unix_account()
    server = accounts_server(serve, spool)
    rcpt = f"{entry.pw_name}@example.test"

    def one(i: int) -> None:
        send(server, rcpt, f"message {i}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(24)))
    got = wait_for_subjects(spool / entry.pw_name, 24)
    assert sorted(got) == sorted(f"message {i}" for i in range(24))


def test_mailbox_owner_and_mode_do_not_depend_on_the_umask(process_server, spool, unix_account):
    entry = unix_account()
    old = os.umask(0o277)  # the server inherits it
    try:
        server = process_server(local={"system_accounts": True, "mail_spool": str(spool)})
    finally:
        os.umask(old)
    send(server, f"{entry.pw_name}@example.test", "whatever the umask")
    path = spool / entry.pw_name
    assert wait_for_subjects(path, 1) == ["whatever the umask"]
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (entry.pw_uid, _mail_gid(), 0o660)


def test_route_shows_the_account(spool, unix_account, tmp_path):
    entry = unix_account()
    path = write_config(tmp_path, local={"system_accounts": True, "mail_spool": str(spool)})
    done = cli("route", "-c", str(path), f"{entry.pw_name}@example.test", "nosuchaccount@example.test")
    assert done.returncode == 2, done.stderr  # the unknown one fails
    out = done.stdout
    assert f"account {entry.pw_name} (uid {entry.pw_uid})" in out, out
    assert f"mbox {spool / entry.pw_name}" in out and f"home {entry.pw_dir}" in out, out
    assert "nosuchaccount@example.test: unknown: FAILS 550 5.1.1" in out, out


# -- routing -----------------------------------------------------------------------------------


def test_unknown_and_low_uid_names_are_refused_at_rcpt(serve, spool):
    server = accounts_server(serve, spool)
    for name in ("nosuchaccount", "daemon", "bin"):
        code, text = rcpt_reply(server, f"{name}@example.test")
        assert (code, text[:5]) == (550, b"5.1.1"), name


def test_accounts_are_local_only_when_switched_on(serve, spool, unix_account):
    entry = unix_account()
    server = serve(local={"mail_spool": str(spool)})  # system_accounts: off (the default)
    code, text = rcpt_reply(server, f"{entry.pw_name}@example.test")
    assert (code, text[:5]) == (550, b"5.1.1")


def test_a_toml_user_wins_over_an_account_of_the_same_name(serve, spool, unix_account, tmp_path):
    entry = unix_account()
    server = accounts_server(serve, spool, users={entry.pw_name: {}, "alice": {}})
    send(server, f"{entry.pw_name}@example.test", "for the toml user")
    maildir = tmp_path / "mail" / entry.pw_name
    wait_until(lambda: (maildir / "new").is_dir() and len(os.listdir(maildir / "new")) == 1)
    assert not (spool / entry.pw_name).exists()


def test_aliases_reach_accounts_and_root_gets_its_mailbox_without_its_recipes(
        serve, spool, unix_account, caplog):
    caplog.set_level(logging.INFO, logger="monomail")
    entry = unix_account()
    rcfile = Path(pwd_home("root")) / ".procmailrc"
    if rcfile.exists() or rcfile.is_symlink():
        pytest.skip(f"{rcfile} exists here; not touched")
    rcfile.write_text(":0\n| /bin/touch /tmp/monomail-root-recipe-ran\n")
    try:
        friends = [f"{entry.pw_name}@example.test"]  # (config checks bare targets against TOML users)
        server = accounts_server(serve, spool, aliases={"postmaster": ["alice"], "friends": friends})
        send(server, "friends@example.test", "via alias")
        send(server, "root@example.test", "for root")
        assert wait_for_subjects(spool / entry.pw_name, 1) == ["via alias"]
        assert wait_for_subjects(spool / "root", 1) == ["for root"]
        assert (spool / "root").stat().st_uid == 0
        wait_until(lambda: "recipes never run as root" in caplog.text)
        assert not Path("/tmp/monomail-root-recipe-ran").exists()
    finally:
        rcfile.unlink()


def pwd_home(name: str) -> str:
    import pwd

    return pwd.getpwnam(name).pw_dir


def test_a_planted_monomail_dot_lock_of_another_uid_never_cuts_a_mailbox(serve, spool, unix_account, caplog):
    """In a spool others may write (1777 on some systems), a ``<name>.lock`` holding our record
    but made by somebody else is a foreign lock: waited for, never a reason to cut the mbox."""
    caplog.set_level(logging.INFO, logger="monomail")
    owner, other = unix_account(), unix_account()
    path = spool / owner.pw_name
    path.write_text("From old@mail.test Tue Dec  1 10:00:00 2026\nSubject: kept\n\nold mail\n\n")
    os.chown(path, owner.pw_uid, _mail_gid())
    path.chmod(0o660)
    planted = Path(f"{path}.lock")
    planted.write_text("monomail 0\n")
    os.chown(planted, other.pw_uid, other.pw_gid)
    server = accounts_server(serve, spool, local={"lock_timeout": "1s"})
    send(server, f"{owner.pw_name}@example.test", "new")
    wait_until(lambda: "foreign dot-lock" in caplog.text)
    assert subjects(path) == ["kept"]
    planted.unlink()  # gone: the retry delivers
    assert wait_for_subjects(path, 2) == ["kept", "new"]


def test_aliases_name_accounts_and_postmaster_falls_back_to_root(serve: Any, spool: Path, unix_account: Any):
    """``root = ["<account>"]`` is a valid alias target with system accounts (Debian's
    /etc/aliases habit), and with no postmaster alias and no TOML user, postmaster@ is root's."""
    person = unix_account()
    server = accounts_server(serve, spool, aliases={"root": [person.pw_name]})
    send(server, "root@example.test", "to root")
    assert wait_for_subjects(spool / person.pw_name, 1) == ["to root"]
    assert rcpt_reply(server, "mmtnobody-here@example.test")[0] == 550
    path = spool.parent / "bare.toml"  # no TOML users, no postmaster alias
    path.write_text(f'[local]\ndomains = ["example.test"]\nsystem_accounts = true\nmail_spool = "{spool}"\n'
                    f'[aliases]\nroot = ["{person.pw_name}"]\ntypo = ["no-such-name-x"]\n')
    out = cli("check-config", "-c", str(path))  # an account name is looked up when mail is routed
    assert out.returncode == 0, out.stderr
    assert "aliases.postmaster: not defined; postmaster@ goes to root" in out.stderr
    out = cli("route", "-c", str(path), "postmaster@example.test")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "postmaster (no alias: root)" in out.stdout and f"account {person.pw_name}" in out.stdout
    assert str(spool / person.pw_name) in out.stdout
