"""The password file and ``monomail passwd``: real files, the real command, a real terminal.

Hashes are passlib's scrypt format (checked against a hash passlib 1.7.4 made); the file is
re-read when it changes; an unreadable file is `AuthUnavailable`, never "wrong password";
``monomail passwd`` reads the password from a pipe or from two prompts on a pty.
"""

from __future__ import annotations

import logging
import os
import pty
import select
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli, write_config

from monomail.errors import AuthUnavailable
from monomail.passwords import DUMMY_HASH, PasswordFile, hash_password, set_password, verify

# Made by passlib 1.7.4: scrypt.using(rounds=12).hash("pässwörd") (ln=12: other parameters
# than ours; '+' and '/' in the base64).
PASSLIB_LN12 = "$scrypt$ln=12,r=8,p=1$fw/h/D8nRKj1vlfK+b8Xgg$0KmByfIOiSQtD7oEfAgLlNtEuRfQf+XgB6Qy7r0lhZg"


# --- hashes ---------------------------------------------------------------------------


def test_hash_format_round_trip():
    h = hash_password(b"correct horse")
    scheme, params, salt, digest = h.split("$")[1:]
    assert (scheme, params) == ("scrypt", "ln=14,r=8,p=1")
    assert len(salt) == 22 and len(digest) == 43  # 16 and 32 bytes, base64 without '='
    assert "=" not in salt + digest and ":" not in h and "correct" not in h
    assert verify(h, b"correct horse")
    assert not verify(h, b"correct horsE") and not verify(h, b"") and not verify(h, b"correct horse\n")
    assert hash_password(b"correct horse") != h  # a new salt each time


def test_a_hash_passlib_made_with_other_parameters_verifies():
    assert verify(PASSLIB_LN12, "pässwörd".encode())
    assert not verify(PASSLIB_LN12, b"passwort")
    assert verify(PASSLIB_LN12.replace("ln=12", "ln=13"), "pässwörd".encode()) is False


@pytest.mark.parametrize("stored", [
    "", "x", "$scrypt$", "$scrypt$ln=14,r=8,p=1$", "$scrypt$ln=14,r=8,p=1$$",
    PASSLIB_LN12.replace("ln=12", "ln=9"),      # below the sane bounds
    PASSLIB_LN12.replace("ln=12", "ln=21"),     # above
    PASSLIB_LN12.replace("ln=12", "ln=012"),    # leading zero
    PASSLIB_LN12.replace("ln=12", "ln=-1"),
    PASSLIB_LN12.replace("r=8", "r=0"), PASSLIB_LN12.replace("r=8", "r=33"),
    PASSLIB_LN12.replace("p=1", "p=0"), PASSLIB_LN12.replace("p=1", "p=17"),
    PASSLIB_LN12.replace("ln=12,r=8,p=1", "ln=20,r=32,p=1"),  # 4 GiB: more than MAX_MEMORY
    PASSLIB_LN12.replace("ln=12,r=8", "r=8,ln=12"),
    PASSLIB_LN12.replace("$scrypt$", "$7$"), PASSLIB_LN12.replace("$scrypt$", "$SCRYPT$"),
    PASSLIB_LN12[:-1],                          # digest 31 bytes and a bit
    PASSLIB_LN12[:-4],                          # 29 bytes
    PASSLIB_LN12 + "A",                         # a base64 length that cannot be
    PASSLIB_LN12 + "AAAA",                      # 35 bytes
    PASSLIB_LN12 + "$",
    PASSLIB_LN12.replace("fw/h", "fw.h"),       # passlib's ab64 alphabet is not this format's
    PASSLIB_LN12.replace("fw/h", "fw=h"),
    PASSLIB_LN12.replace("$fw/h/D8nRKj1vlfK+b8Xgg$", "$AAAA$"),  # 3-byte salt
    PASSLIB_LN12.replace("ln=12", "ln=١٢"),     # Arabic-Indic digits are not digits here
    PASSLIB_LN12 + "\n", " " + PASSLIB_LN12, "\x00" * 40,
])
def test_malformed_hashes_are_false_never_an_exception(stored: str):
    assert verify(stored, "pässwörd".encode()) is False


def test_the_dummy_hash_is_one_of_ours():
    """Unknown users are checked against it: it must cost what a real one does."""
    assert DUMMY_HASH.startswith("$scrypt$ln=14,r=8,p=1$") and not verify(DUMMY_HASH, b"")


# --- the password file ----------------------------------------------------------------


def test_check_reads_the_file_and_rereads_it_when_it_changes(tmp_path: Path):
    path = tmp_path / "passwords"
    path.write_text(f"# users\n\nalice:{hash_password(b'one')}\nBob:{PASSLIB_LN12}\n")
    pf = PasswordFile(path)
    assert pf.check("alice", b"one") and pf.check("ALICE", b"one")
    assert pf.check("bob", "pässwörd".encode())
    assert not pf.check("alice", b"two")
    set_password(path, "alice", b"two")  # a rename: new inode
    assert pf.check("alice", b"two") and not pf.check("alice", b"one")
    # Rewritten in place (same inode), same size, only the mtime moves on.
    text = path.read_text()
    new = hash_password(b"three")
    assert len(new) == len(text.splitlines()[2].split(":", 1)[1])
    with open(path, "r+") as f:
        f.write(text.replace(text.splitlines()[2], f"alice:{new}"))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert pf.check("alice", b"three")
    path.unlink()
    assert not pf.check("alice", b"three")  # missing: nobody logs in
    path.write_text(f"alice:{new}\n")
    assert pf.check("alice", b"three")


def test_unknown_user_is_false_and_takes_as_long(tmp_path: Path):
    path = tmp_path / "passwords"
    path.write_text(f"alice:{hash_password(b'one')}\n")
    pf = PasswordFile(path)
    assert not pf.check("mallory", b"one") and not pf.check("", b"one") and not pf.check("alice:", b"one")

    def best(user: str) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            pf.check(user, b"wrong")
            times.append(time.perf_counter() - t)
        return min(times)

    known, unknown = best("alice"), best("mallory")
    assert unknown > known / 3 and known > unknown / 3, (known, unknown)  # both do one scrypt


def test_missing_file_means_nobody_logs_in(tmp_path: Path):
    assert not PasswordFile(tmp_path / "passwords").check("alice", b"x")


def test_unreadable_file_is_auth_unavailable(tmp_path: Path):
    """A folder where the file should be cannot be read, even by root (IsADirectoryError)."""
    path = tmp_path / "passwords"
    path.mkdir()
    pf = PasswordFile(path)
    with pytest.raises(AuthUnavailable) as info:
        pf.check("alice", b"x")
    assert info.value.reply.code == 454 and info.value.reply.status == "4.7.0"
    assert str(path) in info.value.detail
    with pytest.raises(AuthUnavailable):  # not cached as "empty": asked again, same answer
        pf.check("alice", b"x")
    path.rmdir()
    path.write_text(f"alice:{hash_password(b'x')}\n")
    assert pf.check("alice", b"x")


def test_path_through_a_file_is_auth_unavailable(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(AuthUnavailable):
        PasswordFile(tmp_path / "file" / "passwords").check("alice", b"x")


def test_malformed_lines_are_skipped_and_logged_once_without_content(tmp_path: Path, caplog):
    path = tmp_path / "passwords"
    good = hash_password(b"pw")
    path.write_bytes(b"\n".join([
        b"# comment", b"hunter2",                  # 2: a password pasted by mistake
        b"carol:$scrypt$ln=14,r=8,p=1$bad$bad",    # 3
        f"alice:{good}".encode(),                  # 4
        f"alice:{hash_password(b'other')}".encode(),  # 5: named again, ignored
        b"\xff\xfe:" + good.encode(),              # 6: not ASCII
        f":{good}".encode(),                       # 7: no user
        f"  dave:{good}\r".encode(),               # 8: spaces and CR around are fine
        b"",
    ]))
    pf = PasswordFile(path)
    with caplog.at_level(logging.WARNING, logger="monomail.auth"):
        assert pf.check("alice", b"pw") and not pf.check("alice", b"other")
        assert pf.check("dave", b"pw") and not pf.check("carol", b"pw")
    lines = [r.getMessage() for r in caplog.records if r.name == "monomail.auth"]
    assert sorted(f"{path}:{n}" for n in (2, 3, 5, 6, 7)) == sorted(m.split()[2].rstrip(":") for m in lines)
    text = "\n".join(lines)
    assert "hunter2" not in text and "$scrypt$" not in text and "carol" not in text


def test_set_password_keeps_other_lines_and_replaces_in_place(tmp_path: Path):
    path = tmp_path / "passwords"
    path.write_text(f"# who may send\nBob:{PASSLIB_LN12}\n\n  # alice below\nALICE:*disabled*\ncarol:x")
    set_password(path, "alice", b"new")
    lines = path.read_text().split("\n")
    assert lines[:4] == ["# who may send", f"Bob:{PASSLIB_LN12}", "", "  # alice below"]
    assert lines[4].startswith("alice:$scrypt$ln=14,r=8,p=1$") and lines[5:] == ["carol:x", ""]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    set_password(path, "dave", b"d")
    assert path.read_text().split("\n")[:6] == lines[:6] and path.read_text().split("\n")[6].startswith("dave:")
    pf = PasswordFile(path)
    assert pf.check("alice", b"new") and pf.check("dave", b"d") and pf.check("bob", "pässwörd".encode())
    with pytest.raises(ValueError):
        set_password(path, "alice", b"")
    with pytest.raises(ValueError):
        set_password(path, "al:ice", b"x")


def test_set_password_through_a_symlink_rewrites_its_target(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    target = tmp_path / "etc" / "passwords"
    target.write_text("# managed elsewhere\n")
    (tmp_path / "passwords").symlink_to(target)
    set_password(tmp_path / "passwords", "alice", b"pw")
    assert (tmp_path / "passwords").is_symlink()
    assert PasswordFile(tmp_path / "passwords").check("alice", b"pw") and PasswordFile(target).check("alice", b"pw")


def test_set_password_creates_the_file_mode_0600(tmp_path: Path):
    path = tmp_path / "passwords"
    old = os.umask(0)
    try:
        set_password(path, "Alice", b"pw")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("alice:$scrypt$") and path.read_text().count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["passwords"]  # no temporary left behind


# --- monomail passwd ------------------------------------------------------------------


def passwd(config: Path, user: str, stdin: bytes, timeout: float = 30):
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "monomail", "passwd", user, "-c", str(config)],
                          input=stdin, capture_output=True, timeout=timeout, env=env)


def test_passwd_from_a_pipe_sets_a_password_the_file_accepts(tmp_path: Path):
    config = write_config(tmp_path)
    path = tmp_path / "passwords"  # the default: next to the config file
    path.write_text(f"# kept\nbob:{PASSLIB_LN12}\n")
    out = passwd(config, "Alice", b" s3cr\xc3\xa9t pass \r\nsecond line\n")  # only CR LF stripped
    assert (out.returncode, out.stdout, out.stderr) == (0, b"password set for alice\n", b"")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith(f"# kept\nbob:{PASSLIB_LN12}\nalice:$scrypt$")
    pf = PasswordFile(path)
    assert pf.check("alice", " s3crét pass ".encode()) and not pf.check("alice", "s3crét pass".encode())
    before = path.read_text().splitlines()
    assert passwd(config, "alice", b"other").returncode == 0  # no newline at the end: fine
    after = path.read_text().splitlines()
    assert after[:2] == before[:2] and len(after) == 3 and after[2] != before[2]
    assert pf.check("alice", b"other") and pf.check("bob", "pässwörd".encode())


def test_passwd_writes_auth_password_file(tmp_path: Path):
    config = write_config(tmp_path, auth={"password_file": "etc/users.pw"})
    (tmp_path / "etc").mkdir()
    assert passwd(config, "carol", b"pw\n").returncode == 0
    assert PasswordFile(tmp_path / "etc" / "users.pw").check("carol", b"pw")
    assert not (tmp_path / "passwords").exists()


def test_passwd_unknown_user_exit_2(tmp_path: Path):
    config = write_config(tmp_path)
    out = passwd(config, "Mallory", b"pw\n")
    assert out.returncode == 2 and out.stdout == b""
    assert out.stderr == b"monomail passwd: no such user in [users]: Mallory\n"
    assert not (tmp_path / "passwords").exists()


def test_passwd_refuses_when_dovecot_has_the_passwords(tmp_path: Path):
    config = write_config(tmp_path, auth={"dovecot": "dovecot:/run/dovecot/auth-client"})
    out = passwd(config, "alice", b"pw\n")
    assert out.returncode == 2 and out.stderr.count(b"\n") == 1 and b"Dovecot" in out.stderr
    assert not (tmp_path / "passwords").exists()


@pytest.mark.parametrize("stdin", [b"", b"\n", b"\r\n", b"x" * 1025 + b"\n"])
def test_passwd_refuses_an_empty_or_huge_password(tmp_path: Path, stdin: bytes):
    config = write_config(tmp_path)
    out = passwd(config, "alice", stdin)
    assert out.returncode == 1 and out.stderr.startswith(b"monomail passwd: ")
    assert out.stderr.count(b"\n") == 1 and not (tmp_path / "passwords").exists()


def test_passwd_bad_config_is_exit_2(tmp_path: Path):
    (tmp_path / "monomail.toml").write_text("[auth]\nbogus = 1\n")
    out = cli("passwd", "alice", "-c", str(tmp_path / "monomail.toml"))
    assert out.returncode == 2 and "auth.bogus" in out.stderr and "Traceback" not in out.stderr


def on_a_terminal(config: Path, user: str, answers: list[bytes], timeout: float = 30) -> tuple[int, bytes]:
    """Run ``monomail passwd`` on a pty (its controlling terminal); answer each prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.environ["PYTHONPATH"] = str(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "monomail", "passwd", user, "-c", str(config)])
    deadline = time.monotonic() + timeout
    seen = b""
    try:
        pending = list(answers)
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; the terminal showed {seen!r}"
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if pending and seen.rstrip().endswith(b"password:"):
                os.write(fd, pending.pop(0) + b"\n")
                seen += b"<answered>"
        _, status = os.waitpid(pid, 0)
        pid = 0
        return os.waitstatus_to_exitcode(status), seen
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_passwd_on_a_terminal_prompts_twice(tmp_path: Path):
    config = write_config(tmp_path)
    code, shown = on_a_terminal(config, "bob", [b"tty pass", b"tty pass"])
    assert code == 0, shown
    assert shown.count(b"New password: ") == 1 and shown.count(b"Retype new password: ") == 1
    assert b"tty pass" not in shown  # not echoed
    assert b"password set for bob" in shown
    assert PasswordFile(tmp_path / "passwords").check("bob", b"tty pass")


def test_passwd_on_a_terminal_mismatch_changes_nothing(tmp_path: Path):
    config = write_config(tmp_path)
    code, shown = on_a_terminal(config, "bob", [b"one", b"two"])
    assert code == 1, shown
    assert b"do not match" in shown and b"password set" not in shown
    assert not (tmp_path / "passwords").exists()
