"""The one safe-write helper against real files, a real umask and a real full disk."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fulldisk import fill, open_fds, small_tmpfs

from monomail import safeio

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o277], ids=["umask000", "umask077", "umask277"])
def test_modes_are_exact_whatever_the_umask(tmp_path: Path, umask: int):
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from pathlib import Path
        from monomail import safeio
        os.umask({umask})
        base = Path({str(tmp_path)!r})
        safeio.make_dirs(base / "a" / "b" / "c")
        safeio.write_file(base / "a" / "b" / "c" / "f", b"data")
        safeio.write_file(base / "a" / "pub", b"data", mode=0o644)
        safeio.make_dirs(base / "x", mode=0o750)
    """)], cwd=ROOT, check=True, timeout=30)
    for folder in ("a", "a/b", "a/b/c"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o700, folder
    assert (tmp_path / "a/b/c/f").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a/pub").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o750


def test_make_dirs_keeps_existing_modes_and_refuses_a_file_in_the_way(tmp_path: Path):
    (tmp_path / "a").mkdir(mode=0o755)
    (tmp_path / "a").chmod(0o755)
    safeio.make_dirs(tmp_path / "a" / "b")
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    safeio.make_dirs(tmp_path / "a" / "b")  # already there: nothing to do
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        safeio.make_dirs(tmp_path / "file" / "sub")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError):
        safeio.make_dirs(tmp_path / "dangling")


def test_write_file_replaces_whole_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "t"
    safeio.write_file(target, [b"one ", memoryview(b"two "), b"", bytearray(b"three")])
    assert target.read_bytes() == b"one two three"
    inode = target.stat().st_ino
    safeio.write_file(target, b"new", sync_dir=False)
    assert target.read_bytes() == b"new" and target.stat().st_ino != inode
    assert os.listdir(tmp_path) == ["t"]


def test_write_file_on_a_full_disk_keeps_the_old_file(tmp_path: Path):
    with small_tmpfs(tmp_path / "small") as disk:
        target = disk / "t"
        safeio.write_file(target, b"old content")
        fill(disk)
        before = open_fds()
        with pytest.raises(OSError) as info:
            safeio.write_file(target, b"n" * 10_000)
        assert info.value.errno == errno.ENOSPC
        assert target.read_bytes() == b"old content"
        assert sorted(os.listdir(disk)) == ["filler", "t"]
        assert open_fds() <= before  # none leaked


def test_write_all_resumes_after_short_writes(tmp_path: Path):
    """A near-full disk makes writev write less than asked: what fits is written, in
    order, before the disk-full error."""
    with small_tmpfs(tmp_path / "small") as disk:
        chunks = [bytes([65 + i % 26]) * 3000 for i in range(40)]
        fd = os.open(disk / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as info:
                safeio.write_all(fd, chunks)
        finally:
            os.close(fd)
        assert info.value.errno == errno.ENOSPC
        data = (disk / "f").read_bytes()
        assert len(data) > 0 and data == b"".join(chunks)[: len(data)]
