"""The mbox dot-lock against real files, real foreign lockers (procmail's ``lockfile``,
liblockfile's ``dotlockfile``), real processes killed by SIGKILL and a real full disk
(a 64 KiB tmpfs, where the test runs as root)."""

from __future__ import annotations

import contextlib
import errno
import mailbox
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fulldisk import fill, open_fds, small_tmpfs

from monomail import mailstore, mboxlock
from monomail.errors import MailboxLocked

ROOT = Path(__file__).resolve().parent.parent
MSG = b"Subject: one\n\nbody\n"


def deliver(path: Path, timeout: float, subject: str = "one") -> float:
    """Deliver one message to the mbox; returns how long it took."""
    start = time.monotonic()
    mailstore.deliver_mbox(path, [("a@x", 0.0, [b"Subject: %s\n\nbody\n" % subject.encode()])], timeout)
    return time.monotonic() - start


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def stray_files(folder: Path, mbox: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n != mbox.name)


# --------------------------------------------------------------------------- leftovers


def test_empty_leftover_lock_is_broken_at_once(tmp_path: Path):
    """An empty dot-lock (a writer killed between creating and writing it) while nobody
    holds the mbox's fcntl lock has no live owner: the next delivery takes over at once."""
    path = tmp_path / "box"
    lock = tmp_path / "box.lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 60, time.time() - 60))  # left by a kill a minute ago
    assert deliver(path, timeout=3) < 1.0
    assert [m["Subject"] for m in mailbox.mbox(path, create=False)] == ["one"]
    assert stray_files(tmp_path, path) == []


def test_fresh_empty_lock_waits_only_a_short_grace(tmp_path: Path):
    """A fresh empty lock may be Postfix's or Exim's (they write none, and take the
    fcntl lock after it): it is honoured for EMPTY_LOCK_GRACE seconds, never 600."""
    path = tmp_path / "box"
    (tmp_path / "box.lock").write_bytes(b"")
    took = deliver(path, timeout=30)
    assert took < mboxlock.EMPTY_LOCK_GRACE + 1.0
    assert len(mailbox.mbox(path, create=False)) == 1


def test_start_up_recovery_breaks_an_empty_lock(tmp_path: Path):
    path = tmp_path / "box"
    deliver(path, timeout=1)
    lock = tmp_path / "box.lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    mailstore.recover_mbox(path)  # raised MailboxLocked before
    assert not lock.exists()
    assert len(mailbox.mbox(path, create=False)) == 1


def test_lock_with_a_dead_pid_is_broken_at_once(tmp_path: Path):
    path = tmp_path / "box"
    (tmp_path / "box.lock").write_text(f"{dead_pid()}\n")
    assert deliver(path, timeout=3) < 1.0
    assert not (tmp_path / "box.lock").exists()


@pytest.mark.skipif(not shutil.which("dotlockfile"), reason="liblockfile's dotlockfile not installed")
def test_dotlockfile_killed_holding_its_lock_is_broken_at_once(tmp_path: Path):
    """liblockfile's ``dotlockfile -p`` writes its pid; SIGKILL leaves the lock behind."""
    path = tmp_path / "box"
    path.write_bytes(b"")
    lock = tmp_path / "box.lock"
    holder = subprocess.Popen(["dotlockfile", "-p", "-l", "-r", "0", str(lock), "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not (lock.exists() and lock.read_bytes().strip()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert int(lock.read_bytes()) == holder.pid
        with pytest.raises(MailboxLocked, match=f"pid {holder.pid}"):
            deliver(path, timeout=0.3)  # alive: honoured
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()
    assert deliver(path, timeout=3) < 1.0
    assert len(mailbox.mbox(path, create=False)) == 1


def test_lock_of_a_live_process_waits_then_gives_up(tmp_path: Path):
    path = tmp_path / "box"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "box.lock").write_text(f"{sleeper.pid}\n")
        start = time.monotonic()
        with pytest.raises(MailboxLocked):
            deliver(path, timeout=0.5)
        assert time.monotonic() - start >= 0.5
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not path.exists() or path.read_bytes() == b""
    assert deliver(path, timeout=3) < 1.0  # the owner is gone now


@pytest.mark.skipif(not shutil.which("lockfile"), reason="procmail's lockfile not installed")
def test_procmail_lockfile_is_honoured_until_removed(tmp_path: Path):
    """procmail's ``lockfile`` writes "0" (no pid) and takes no fcntl lock: nothing can
    be judged, so it is waited for (the 600 s staleness rule stays for such locks)."""
    path = tmp_path / "box"
    lock = tmp_path / "box.lock"
    subprocess.run(["lockfile", "-r0", str(lock)], check=True, timeout=10)
    assert lock.read_bytes() == b"0"
    with pytest.raises(MailboxLocked):
        deliver(path, timeout=0.3)
    os.chmod(lock, 0o644)
    lock.unlink()  # what `rm -f box.lock` does after procmail's lockfile
    assert deliver(path, timeout=3) < 1.0


@pytest.mark.skipif(not shutil.which("lockfile"), reason="procmail's lockfile not installed")
def test_foreign_lockers_see_our_lock_while_we_hold_it(tmp_path: Path):
    path = tmp_path / "box"
    with mboxlock.locked_mbox(path, 1):
        assert (tmp_path / "box.lock").read_bytes() == b"monomail 0\n"
        assert subprocess.run(["lockfile", "-r0", str(tmp_path / "box.lock")], timeout=10).returncode != 0
        if shutil.which("dotlockfile"):
            assert subprocess.run(["dotlockfile", "-l", "-r", "0", str(tmp_path / "box.lock")],
                                  timeout=10).returncode != 0
    assert not (tmp_path / "box.lock").exists()


# --------------------------------------------------------------------------- atomic lock content


def _watch_lock(lock: Path, seconds: float) -> tuple[int, set[bytes]]:
    """Read the lock file as often as possible for ``seconds``; returns (reads, bad contents)."""
    bad: set[bytes] = set()
    reads = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = lock.read_bytes()
        except FileNotFoundError:
            continue
        reads += 1
        if not re.fullmatch(rb"monomail \d+\n", data):
            bad.add(data)
    return reads, bad


@pytest.mark.parametrize("how", ["take", "write_dotlock"])
def test_a_dotlock_always_has_its_full_content(tmp_path: Path, how: str):
    """Another process takes the lock (or rewrites its record) in a tight loop; whoever
    looks at the lock file sees a whole ``monomail SIZE`` record, never an empty file."""
    path = tmp_path / "box"
    path.write_bytes(b"")
    lock = tmp_path / "box.lock"
    body = {
        "take": "while True:\n    with mboxlock.locked_mbox(path, 5):\n        pass\n",
        "write_dotlock": "with mboxlock.locked_mbox(path, 5):\n    n = 0\n    while True:\n"
                         "        mboxlock.write_dotlock(lock, n)\n        n += 1\n",
    }[how]
    code = f"import sys\nfrom pathlib import Path\nfrom monomail import mboxlock\n" \
           f"path = Path({str(path)!r})\nlock = Path({str(lock)!r})\nprint('go', flush=True)\n{body}"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"go\n"
        reads, bad = _watch_lock(lock, 1.5)
    finally:
        child.kill()
        child.wait()
    assert reads > 50
    assert not bad, f"{len(bad)} torn lock contents seen in {reads} reads: {sorted(bad)[:3]}"


# --------------------------------------------------------------------------- kills


WRITER = """
import os, sys
from pathlib import Path
from monomail import mailstore, mboxlock
path = Path(sys.argv[1])
n = 0
print("ready", flush=True)
while True:
    n += 1
    body = b"".join(b"line %d of message %d %s\\n" % (i, n, b"x" * 60) for i in range(200))
    mailstore.deliver_mbox(path, [("w@x", 0.0, [b"Subject: w%d\\nX-Lines: 200\\n\\n" % n, body])], 10)
    with mboxlock.locked_mbox(path, 10):
        pass
"""


def test_sigkill_storm_on_the_locking_never_blocks_the_next_writer(tmp_path: Path):
    """A writer killed at random points, 40 times: each time the next delivery completes
    within a second, and the mbox holds only whole messages."""
    path = tmp_path / "box"
    rng = random.Random(8)
    for ours in range(1, 41):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0, 0.04))
        child.send_signal(signal.SIGKILL)
        child.wait()
        took = deliver(path, timeout=5, subject=f"next{ours}")
        assert took < 1.0, f"the next delivery after a kill took {took:.2f} s"
        assert stray_files(tmp_path, path) == []
    box = mailbox.mbox(path, create=False)
    subjects = []
    for msg in box:
        subject = msg["Subject"]
        subjects.append(subject)
        if subject.startswith("w"):
            n = int(subject[1:])
            lines = msg.get_payload().splitlines()
            assert len(lines) == 200, f"{subject}: half a message ({len(lines)} lines)"
            assert lines[-1] == f"line 199 of message {n} " + "x" * 60
        else:
            assert msg.get_payload() == "body\n"
    assert [s for s in subjects if s.startswith("next")] == [f"next{i}" for i in range(1, 41)]


# --------------------------------------------------------------------------- full disk


def test_full_disk_leaves_no_lock_and_leaks_no_fd(tmp_path: Path):
    with small_tmpfs(tmp_path / "small") as disk:
        path = disk / "box"
        deliver(path, timeout=1)
        good = path.read_bytes()
        filler = fill(disk)
        before = open_fds()
        for _ in range(5):
            with pytest.raises(OSError) as info:
                deliver(path, timeout=1)
            assert info.value.errno == errno.ENOSPC
        assert open_fds() <= before  # none leaked
        assert stray_files(disk, path) == ["filler"]  # no empty box.lock, no temp file
        assert path.read_bytes() == good
        filler.unlink()
        assert deliver(path, timeout=3) < 1.0  # not blocked afterwards
        assert len(mailbox.mbox(path, create=False)) == 2


def test_full_disk_mid_message_cuts_back_and_unlocks(tmp_path: Path):
    """Room for the lock but not for the message: the mbox is cut back, nothing left."""
    with small_tmpfs(tmp_path / "small") as disk:
        path = disk / "box"
        deliver(path, timeout=1)
        good = path.read_bytes()
        filler = fill(disk)
        filler.write_bytes(filler.read_bytes()[:-3 * 4096])  # a few pages free again
        before = open_fds()
        with pytest.raises(OSError) as info:
            mailstore.deliver_mbox(path, [("a@x", 0.0, [b"Subject: big\n\n" + b"y" * 200_000])], 1)
        assert info.value.errno == errno.ENOSPC
        assert open_fds() <= before  # none leaked
        assert path.read_bytes() == good
        assert stray_files(disk, path) == ["filler"]


def test_write_dotlock_on_a_full_disk_keeps_the_old_record(tmp_path: Path):
    with small_tmpfs(tmp_path / "small") as disk:
        path = disk / "box"
        lock = disk / "box.lock"
        with mboxlock.locked_mbox(path, 1):
            fill(disk)
            before = open_fds()
            with contextlib.suppress(OSError):
                mboxlock.write_dotlock(lock, 12345)
            assert lock.read_bytes() in (b"monomail 0\n", b"monomail 12345\n")
            assert open_fds() <= before  # none leaked
        assert not lock.exists()


def test_no_fd_leaks_while_waiting_for_a_foreign_lock(tmp_path: Path):
    path = tmp_path / "box"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "box.lock").write_text(f"{sleeper.pid}\n")
        before = open_fds()
        with pytest.raises(MailboxLocked):
            deliver(path, timeout=0.3)
        assert open_fds() <= before  # none leaked
    finally:
        sleeper.kill()
        sleeper.wait()


def test_mailbox_locked_is_the_one_in_errors():
    assert mailstore.MailboxLocked is MailboxLocked


# --------------------------------------------------------------------------- one process, two fds


HOLDS_LOCK = """
import fcntl, sys
f = open(sys.argv[1], "r+b")
try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    print("held")
else:
    print("free")
"""


def fcntl_lock_seen_by_another_process(path: Path) -> bool:
    out = subprocess.run([sys.executable, "-c", HOLDS_LOCK, str(path)], capture_output=True, timeout=30)
    return out.stdout == b"held\n"


def test_closing_another_fd_of_the_mbox_keeps_our_fcntl_lock(tmp_path: Path):
    """With POSIX locks, closing *any* fd of the file drops the process's lock, so mutt
    or procmail could write while we do. Our lock belongs to our fd."""
    path = tmp_path / "box"
    deliver(path, timeout=1)
    with mboxlock.locked_mbox(path, 1):
        assert fcntl_lock_seen_by_another_process(path)
        with open(path, "rb") as other:  # e.g. a mailbox.mbox() read elsewhere in the process
            other.read()
        assert fcntl_lock_seen_by_another_process(path)
    assert not fcntl_lock_seen_by_another_process(path)


def test_a_second_path_to_the_same_mbox_in_one_process_waits(tmp_path: Path):
    """A symlink is another path, so another in-process lock; the fcntl lock must still
    keep the second thread out (before, it took our live record for a dead writer's and
    cut our message off)."""
    path = tmp_path / "box"
    alias = tmp_path / "alias"
    alias.symlink_to(path)
    deliver(path, timeout=1)
    good = path.read_bytes()
    result: list[BaseException | None] = []
    with mboxlock.locked_mbox(path, 1) as fd:
        os.write(fd, b"From a@x Thu Jan  1 00:00:00 1970\nSubject: in progress\n")

        def other() -> None:
            try:
                deliver(alias, timeout=0.3, subject="other")
                result.append(None)
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(10)
        os.write(fd, b"\nbody\n\n")
    assert len(result) == 1 and isinstance(result[0], MailboxLocked)
    assert path.read_bytes() == good + b"From a@x Thu Jan  1 00:00:00 1970\nSubject: in progress\n\nbody\n\n"
    deliver(alias, timeout=1, subject="other")
    assert [m["Subject"] for m in mailbox.mbox(path, create=False)] == ["one", "in progress", "other"]
