"""mbox and Maildir writers against real files, including a writer killed mid-write."""

from __future__ import annotations

import mailbox
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from monomail import mailstore

MSG = b"Subject: one\n\nFrom me\n>From you\nbody\n"


def test_maildir_write_is_visible_only_in_new(tmp_path: Path):
    name = mailstore.deliver_maildir(tmp_path / "u", [b"Delivered-To: u@x\n", MSG])
    assert (tmp_path / "u" / "new" / name).read_bytes() == b"Delivered-To: u@x\n" + MSG
    assert not os.listdir(tmp_path / "u" / "tmp")
    box = mailbox.Maildir(tmp_path / "u", factory=None, create=False)
    assert [m["Subject"] for m in box] == ["one"]


def test_mbox_quote_is_mboxrd():
    assert mailstore.mbox_quote(b"From a\n>From b\n>>From c\nxFrom d\n") == b">From a\n>>From b\n>>>From c\nxFrom d\n"


def test_mbox_group_commit_and_separation(tmp_path: Path):
    path = tmp_path / "box"
    path.write_bytes(b"From old@x Thu Jan  1 00:00:00 1970\nSubject: old\n\nno trailing blank")
    items = [("a@x", 0.0, [mailstore.mbox_quote(MSG)]), ("", 0.0, [b"Subject: two\n\nbody2"])]
    mailstore.deliver_mbox(path, items, lock_timeout=1)
    msgs = list(mailbox.mbox(path, create=False))
    assert [m["Subject"] for m in msgs] == ["old", "one", "two"]
    assert msgs[1].get_payload() == ">From me\n>>From you\nbody\n"
    assert msgs[2].get_from().startswith("MAILER-DAEMON ")
    assert not (tmp_path / "box.lock").exists()


def test_mbox_waits_for_a_foreign_dotlock_then_gives_up(tmp_path: Path):
    path = tmp_path / "box"
    owner = subprocess.Popen(["sleep", "30"])  # a live foreign locker's pid
    try:
        (tmp_path / "box.lock").write_text(f"{owner.pid}\n")
        with pytest.raises(mailstore.MailboxLocked):
            mailstore.deliver_mbox(path, [("a@x", 0.0, [mailstore.mbox_quote(MSG)])], lock_timeout=0.1)
        assert not path.exists() or path.read_bytes() == b""
        timer = threading.Timer(0.2, (tmp_path / "box.lock").unlink)
        timer.start()
        mailstore.deliver_mbox(path, [("a@x", 0.0, [mailstore.mbox_quote(MSG)])], lock_timeout=5)
        timer.join()
    finally:
        owner.kill()
        owner.wait()
    assert len(mailbox.mbox(path, create=False)) == 1


def test_mbox_fcntl_lock_held_by_another_process_defers(tmp_path: Path):
    path = tmp_path / "box"
    path.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys, time
            f = open({str(path)!r}, "r+b")
            fcntl.lockf(f, fcntl.LOCK_EX)
            print("locked", flush=True)
            time.sleep(30)
        """)], stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(mailstore.MailboxLocked):
            mailstore.deliver_mbox(path, [("a@x", 0.0, [mailstore.mbox_quote(MSG)])], lock_timeout=0.2)
    finally:
        holder.kill()
        holder.wait()
    mailstore.deliver_mbox(path, [("a@x", 0.0, [mailstore.mbox_quote(MSG)])], lock_timeout=2)
    assert len(mailbox.mbox(path, create=False)) == 1


def test_writer_killed_mid_write_leaves_nothing_half_written(tmp_path: Path):
    """A real process takes the locks, writes half a message and dies by SIGKILL."""
    path = tmp_path / "box"
    mailstore.deliver_mbox(path, [("a@x", 0.0, [mailstore.mbox_quote(MSG)])], lock_timeout=1)
    good = path.read_bytes()
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, signal
            from pathlib import Path
            from monomail import mboxlock
            with mboxlock.locked_mbox(Path({str(path)!r}), 1) as fd:
                os.write(fd, b"From half@x Thu Jan  1 00:00:00 1970\\nSubject: half\\n\\npartial bo")
                os.kill(os.getpid(), signal.SIGKILL)
        """)], cwd=Path(__file__).resolve().parent.parent, timeout=30,
    )
    assert child.returncode == -9
    assert path.read_bytes().startswith(good) and len(path.read_bytes()) > len(good)
    assert (tmp_path / "box.lock").read_text() == f"monomail {len(good)}\n"
    mailstore.recover_mbox(path)  # what start-up does
    assert path.read_bytes() == good
    assert not (tmp_path / "box.lock").exists()
    # and the next delivery after such a crash also repairs first:
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import os, signal
            from pathlib import Path
            from monomail import mboxlock
            with mboxlock.locked_mbox(Path({str(path)!r}), 1) as fd:
                os.write(fd, b"From half@x Thu Jan  1 00:00:00 1970\\nSubject: half\\n")
                os.kill(os.getpid(), signal.SIGKILL)
        """)], cwd=Path(__file__).resolve().parent.parent, timeout=30)
    mailstore.deliver_mbox(path, [("b@x", 0.0, [b"Subject: after\n\nok\n"])], lock_timeout=1)
    assert [m["Subject"] for m in mailbox.mbox(path, create=False)] == ["one", "after"]


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o000, 0o277], ids=["umask000", "umask277"])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int):
    """Every folder mailstore creates is 0700 (parents too), every file 0600."""
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from pathlib import Path
        from monomail import mailstore
        os.umask({umask})
        base = Path({str(tmp_path)!r})
        mailstore.deliver_maildir(base / "deep" / "er" / "Maildir", [b"Subject: m\\n\\nx\\n"])
        mailstore.deliver_mbox(base / "spool" / "mail" / "bob", [("a@x", 0.0, [b"Subject: b\\n\\nx\\n"])], 1)
    """)], cwd=Path(__file__).resolve().parent.parent, check=True, timeout=30)

    def mode(p: Path) -> int:
        return p.stat().st_mode & 0o777

    for folder in ("deep", "deep/er", "deep/er/Maildir", "deep/er/Maildir/tmp", "deep/er/Maildir/new",
                   "deep/er/Maildir/cur", "spool", "spool/mail"):
        assert mode(tmp_path / folder) == 0o700, folder
    [name] = os.listdir(tmp_path / "deep/er/Maildir/new")
    assert mode(tmp_path / "deep/er/Maildir/new" / name) == 0o600
    assert mode(tmp_path / "spool/mail/bob") == 0o600


def test_existing_mailbox_modes_are_kept(tmp_path: Path):
    box = tmp_path / "box"
    box.write_bytes(b"")
    box.chmod(0o660)  # /var/mail/user, group mail
    mailstore.deliver_mbox(box, [("a@x", 0.0, [b"Subject: b\n\nx\n"])], 1)
    assert box.stat().st_mode & 0o777 == 0o660
    md = tmp_path / "md"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
        (md / sub).chmod(0o750)
    mailstore.deliver_maildir(md, [MSG])
    assert (md / "new").stat().st_mode & 0o777 == 0o750


# --------------------------------------------------------------------------- Maildir tmp/ cleaning


def _age(path: Path, hours: float) -> None:
    when = time.time() - hours * 3600
    os.utime(path, (when, when), follow_symlinks=False)


def test_clean_maildir_tmp_removes_only_old_regular_files(tmp_path: Path):
    md = tmp_path / "md"
    mailstore.ensure_maildir(md)
    tmp = md / "tmp"
    for name, hours in [("old1", 37), ("old2", 100), ("young", 35), ("fresh", 0)]:
        (tmp / name).write_bytes(b"half a message")
        _age(tmp / name, hours)
    (tmp / "read-recently").write_bytes(b"x")  # modified long ago, but accessed an hour ago
    os.utime(tmp / "read-recently", (time.time() - 3600, time.time() - 40 * 3600))
    outside = tmp_path / "precious"
    outside.write_bytes(b"not mail")
    _age(outside, 100)
    (tmp / "link").symlink_to(outside)
    _age(tmp / "link", 100)
    (tmp / "subdir").mkdir()
    _age(tmp / "subdir", 100)
    (md / "new" / "delivered").write_bytes(b"Subject: s\n\nx\n")
    _age(md / "new" / "delivered", 100)

    assert mailstore.clean_maildir_tmp(md) == 2
    assert sorted(os.listdir(tmp)) == ["fresh", "link", "read-recently", "subdir", "young"]
    assert outside.read_bytes() == b"not mail"
    assert (md / "new" / "delivered").exists()
    assert mailstore.clean_maildir_tmp(md, older_than=30 * 60) == 2  # young and read-recently
    assert mailstore.clean_maildir_tmp(md) == 0


def test_clean_maildir_tmp_never_follows_a_symlinked_folder(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tmp").mkdir(parents=True)
    (elsewhere / "tmp" / "victim").write_bytes(b"x")
    _age(elsewhere / "tmp" / "victim", 100)
    (tmp_path / "md").symlink_to(elsewhere)  # the folder itself a link
    assert mailstore.clean_maildir_tmp(tmp_path / "md") == 0
    md2 = tmp_path / "md2"
    md2.mkdir()
    (md2 / "tmp").symlink_to(elsewhere / "tmp")  # tmp/ a link
    assert mailstore.clean_maildir_tmp(md2) == 0
    assert (elsewhere / "tmp" / "victim").exists()


def test_clean_maildir_tmp_ignores_a_missing_folder(tmp_path: Path):
    assert mailstore.clean_maildir_tmp(tmp_path / "nowhere") == 0
    (tmp_path / "half").mkdir()
    assert mailstore.clean_maildir_tmp(tmp_path / "half") == 0  # no tmp/ yet


def test_clean_maildir_tmp_removes_what_a_killed_writer_left(tmp_path: Path):
    """A writer killed between writing tmp/ and renaming into new/ leaves a real file."""
    md = tmp_path / "md"
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from monomail import mailstore
        def die(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)
        os.rename = die
        mailstore.deliver_maildir(__import__("pathlib").Path({str(md)!r}), [b"Subject: x\\n\\nhalf"])
    """)], cwd=Path(__file__).resolve().parent.parent, timeout=30)
    [left] = os.listdir(md / "tmp")
    assert mailstore.clean_maildir_tmp(md) == 0  # too young
    _age(md / "tmp" / left, 36.5)
    assert mailstore.clean_maildir_tmp(md) == 1
    assert os.listdir(md / "tmp") == []
    assert len(mailbox.Maildir(md, factory=None, create=False)) == 0
