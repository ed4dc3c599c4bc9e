"""A system account's ``~/.procmailrc`` and ``~/.forward``, run and read with its own rights
(issue 11, acceptance 2): folders and pipes as the account, unsafe files ignored with a log
line, a recipe child that dies or hangs is a temporary failure (the message stays queued).

Real throwaway accounts (``unix_account``; skipped when not root), a real server, smtplib,
mailboxes read back with the stdlib ``mailbox`` module.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from test_system_accounts import _mail_gid, accounts_server, send, spool, subjects, wait_for_subjects

__all__ = ["spool"]  # the fixture, used by name below


def put(entry: Any, name: str, text: str, mode: int = 0o644) -> Path:
    """A file in the account's home, owned by it."""
    path = Path(entry.pw_dir) / name
    path.write_text(text)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)
    return path


RECIPES = (
    ":0:\n* ^Subject:.*folder\nfiltered\n\n"
    ":0\n* ^Subject:.*pipe\n"
    "| /bin/sh -c \"id -u > $HOME/uid.txt; id -G > $HOME/groups.txt; env > $HOME/env.tmp; mv env.tmp env.txt\"\n\n"
    ":0\n* ^Subject:.*maildir\nsorted/\n"
)


def test_recipes_write_folders_and_run_pipes_as_the_account(serve, spool, unix_account, caplog):
    caplog.set_level(logging.INFO, logger="monomail")
    entry = unix_account(groups=["mail"])
    home = Path(entry.pw_dir)
    put(entry, ".procmailrc", RECIPES)
    server = accounts_server(serve, spool)  # filters.enabled is off: accounts' recipes run anyway
    rcpt = f"{entry.pw_name}@example.test"
    send(server, rcpt, "into the folder")
    send(server, rcpt, "through a pipe")
    send(server, rcpt, "into a maildir")
    send(server, rcpt, "nothing matches")

    assert wait_for_subjects(home / "filtered", 1) == ["into the folder"]
    wait_until(lambda: (home / "env.txt").exists())  # the pipe ran to its end (in MAILDIR: the home)
    assert (home / "uid.txt").read_text().strip() == str(entry.pw_uid)
    groups = {int(g) for g in (home / "groups.txt").read_text().split()}
    assert groups == {entry.pw_gid, _mail_gid()}  # its supplementary groups, not root's
    env = dict(line.split("=", 1) for line in (home / "env.txt").read_text().splitlines() if "=" in line)
    assert (env["HOME"], env["USER"], env["LOGNAME"], env["SHELL"]) == (
        str(home), entry.pw_name, entry.pw_name, entry.pw_shell)
    assert env["DEFAULT"] == str(spool / entry.pw_name) and env["MAILDIR"] == str(home)
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    wait_until(lambda: (home / "sorted" / "new").is_dir() and len(os.listdir(home / "sorted" / "new")) == 1)
    for made in (home / "filtered", home / "uid.txt", home / "sorted", home / "sorted" / "new",
                 *(home / "sorted" / "new").iterdir()):
        st = made.lstat()
        assert (st.st_uid, st.st_gid) == (entry.pw_uid, entry.pw_gid), made

    # the fall-through to DEFAULT: handed back, written by the server into the spool mbox
    mbox = spool / entry.pw_name
    assert wait_for_subjects(mbox, 1) == ["nothing matches"]
    st = mbox.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (entry.pw_uid, _mail_gid(), 0o660)
    assert subjects(home / "filtered") == ["into the folder"]
    assert server.app.spool.ids() == []


def test_a_recipe_forward_and_a_dot_forward_reach_other_accounts(serve, spool, unix_account):
    one, two, three = unix_account(), unix_account(), unix_account()
    put(one, ".procmailrc", f":0 c\n* ^Subject:.*share\n! {two.pw_name}@example.test\n")
    put(two, ".forward", f"{three.pw_name}@example.test, \\{two.pw_name}\n")
    server = accounts_server(serve, spool)
    send(server, f"{one.pw_name}@example.test", "share this")
    assert wait_for_subjects(spool / one.pw_name, 1) == ["share this"]  # c: a copy stays
    assert wait_for_subjects(spool / two.pw_name, 1) == ["share this"]  # \name: kept a copy
    assert wait_for_subjects(spool / three.pw_name, 1) == ["share this"]


def test_unsafe_dot_forward_files_are_ignored_with_a_log_line(serve, spool, unix_account, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="monomail")
    linked, writable = unix_account(), unix_account()
    secret = tmp_path / "root-only"
    secret.write_text("elsewhere@remote.test\n")
    secret.chmod(0o600)
    link = Path(linked.pw_dir) / ".forward"
    link.symlink_to(secret)
    open_file = put(writable, ".forward", "elsewhere@remote.test\n", mode=0o666)
    open_file.chmod(0o666)
    server = accounts_server(serve, spool)
    send(server, f"{linked.pw_name}@example.test", "not through a link")
    send(server, f"{writable.pw_name}@example.test", "not through an open file")
    assert wait_for_subjects(spool / linked.pw_name, 1) == ["not through a link"]
    assert wait_for_subjects(spool / writable.pw_name, 1) == ["not through an open file"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(link) in w and "symbolic link" in w for w in warnings), warnings
    assert any(str(open_file) in w and "writable by group or others" in w for w in warnings), warnings
    assert server.app.spool.ids() == []  # nothing went to remote.test


def test_unsafe_procmailrc_is_not_run_and_mail_goes_to_the_mailbox(serve, spool, unix_account, caplog):
    caplog.set_level(logging.INFO, logger="monomail")
    linked, writable = unix_account(), unix_account()
    real = put(linked, "rc.real", ":0\nfiltered\n")
    (Path(linked.pw_dir) / ".procmailrc").symlink_to(real)
    put(writable, ".procmailrc", ":0\nfiltered\n", mode=0o666)
    server = accounts_server(serve, spool)
    send(server, f"{linked.pw_name}@example.test", "no linked recipes")
    send(server, f"{writable.pw_name}@example.test", "no open recipes")
    assert wait_for_subjects(spool / linked.pw_name, 1) == ["no linked recipes"]
    assert wait_for_subjects(spool / writable.pw_name, 1) == ["no open recipes"]
    assert not (Path(linked.pw_dir) / "filtered").exists() and not (Path(writable.pw_dir) / "filtered").exists()
    wait_until(lambda: "symbolic link" in caplog.text and "writable by group or others" in caplog.text)


def test_an_account_without_a_home_gets_the_mailbox(serve, spool, unix_account):
    entry = unix_account(home=False)
    server = accounts_server(serve, spool)
    send(server, f"{entry.pw_name}@example.test", "homeless")
    assert wait_for_subjects(spool / entry.pw_name, 1) == ["homeless"]


def test_a_recipe_child_that_dies_is_a_temporary_failure(serve, spool, unix_account, caplog):
    caplog.set_level(logging.INFO, logger="monomail")
    entry = unix_account()
    put(entry, ".procmailrc", ":0\n| /bin/sh -c 'kill -9 $PPID'\n")
    server = accounts_server(serve, spool)
    send(server, f"{entry.pw_name}@example.test", "kills its child")
    wait_until(lambda: "exited with -9" in caplog.text)
    assert len(server.app.spool.ids()) == 1  # kept for a retry
    assert subjects(spool / entry.pw_name) == []
    put(entry, ".procmailrc", "")  # fixed: the retry delivers
    assert wait_for_subjects(spool / entry.pw_name, 1) == ["kills its child"]


def test_a_recipe_child_that_hangs_is_killed_and_the_mail_kept(serve, spool, unix_account, caplog):
    caplog.set_level(logging.INFO, logger="monomail")
    entry = unix_account()
    os.mkfifo(Path(entry.pw_dir) / "jam")
    os.chown(Path(entry.pw_dir) / "jam", entry.pw_uid, entry.pw_gid)
    put(entry, ".procmailrc", ":0\njam\n")  # an mbox "folder" that is a FIFO nobody reads: writes block
    server = accounts_server(serve, spool, filters={"pipe_timeout": "0.5s"}, local={"lock_timeout": "0.5s"},
                             queue={"retry": ["1h"]})
    send(server, f"{entry.pw_name}@example.test", "jams", body=("x" * 70 + "\r\n") * 3000)
    wait_until(lambda: "took longer than" in caplog.text, timeout=30)
    assert len(server.app.spool.ids()) == 1
    assert subjects(spool / entry.pw_name) == []
    wait_until(lambda: not processes_of(entry.pw_uid), timeout=5)  # its process group was killed


def processes_of(uid: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        line = next((x for x in status.splitlines() if x.startswith("Uid:")), "")
        if line.split()[1:2] == [str(uid)]:
            found.append(int(pid))
    return found


def test_the_childs_answer_is_checked_like_user_input():
    from monomail.userchild import ChildResult, RecipeChildFailed

    good = ChildResult(True, [b"Subject: x\n\nbody\n"], [(["a@b.test"], b"m")], [(20, "monomail.filters", "ok")])
    assert ChildResult.decode(good.encode()) == good
    for bad in (b"", b"not json", b'{"delivered": "yes", "handed_back": [], "forwards": [], "logs": []}',
                b'{"delivered": true, "handed_back": ["***"], "forwards": [], "logs": []}',
                b'{"delivered": true, "handed_back": [], "forwards": [[["a b@c"], ""]], "logs": []}',
                b'{"delivered": true, "handed_back": [], "forwards": [[[], ""]], "logs": []}'):
        with pytest.raises(RecipeChildFailed):
            ChildResult.decode(bad)
