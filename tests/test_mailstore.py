"""mbox and Maildir writers against real files, including a writer killed mid-write."""

from __future__ import annotations

import mailbox
import os
import subprocess
import sys
import textwrap
import threading
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
    (tmp_path / "box.lock").write_text("4242\n")
    with pytest.raises(mailstore.MailboxLocked):
        mailstore.deliver_mbox(path, [("a@x", 0.0, [mailstore.mbox_quote(MSG)])], lock_timeout=0.1)
    assert not path.exists() or path.read_bytes() == b""
    timer = threading.Timer(0.2, (tmp_path / "box.lock").unlink)
    timer.start()
    mailstore.deliver_mbox(path, [("a@x", 0.0, [mailstore.mbox_quote(MSG)])], lock_timeout=5)
    timer.join()
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
            from monomail import mailstore
            with mailstore.locked_mbox(Path({str(path)!r}), 1) as fd:
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
            from monomail import mailstore
            with mailstore.locked_mbox(Path({str(path)!r}), 1) as fd:
                os.write(fd, b"From half@x Thu Jan  1 00:00:00 1970\\nSubject: half\\n")
                os.kill(os.getpid(), signal.SIGKILL)
        """)], cwd=Path(__file__).resolve().parent.parent, timeout=30)
    mailstore.deliver_mbox(path, [("b@x", 0.0, [b"Subject: after\n\nok\n"])], lock_timeout=1)
    assert [m["Subject"] for m in mailbox.mbox(path, create=False)] == ["one", "after"]
