"""``monomail mail`` (monomail.reader) against real mailboxes written by monomail's own
writers: the summary and -p as a subprocess, commands in-process, whole sessions on a
real terminal (tmux), deliveries racing a session, and a reader killed at every step of
an mbox rewrite. Mailboxes are checked with the stdlib ``mailbox`` module and byte for
byte."""

from __future__ import annotations

import io
import mailbox
import os
import re
import shlex
import shutil
import smtplib
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config

from monomail import mailstore, mboxrewrite, reader

pytestmark = pytest.mark.timeout(10)
WHEN = 1_700_000_000.0  # fixed arrival time: deterministic From lines


def message(i: int | str, extra: str = "") -> bytes:
    return (f"Return-Path: <s{i}@example.test>\nFrom: Sender {i} <s{i}@example.test>\nTo: bob@example.test\n"
            f"Subject: hello {i}\nMessage-ID: <m{i}@example.test>\nDate: Tue, 14 Nov 2023 22:13:20 +0000\n"
            f"{extra}\nFrom body {i}\n>From quoted {i}\nlast line {i}\n").encode()


def add_mbox(path: Path, i: int | str, extra: str = "") -> bytes:
    """Deliver one message as monomail does; returns the bytes it appended."""
    item = (f"s{i}@example.test", WHEN, [mailstore.mbox_quote(message(i, extra))])
    mailstore.deliver_mbox(path, [item], lock_timeout=5)
    return mailstore.from_line(item[0], WHEN) + item[2][0] + b"\n"


def make_mbox(path: Path, n: int = 3) -> Path:
    for i in range(n):
        add_mbox(path, i)
    return path


def make_maildir(path: Path, n: int = 3) -> dict[int, str]:
    names = {}
    for i in range(n):
        names[i] = mailstore.deliver_maildir(path, [message(i)])
        time.sleep(0.002)  # distinct delivery times, so the order is the delivery order
    return names


def subjects(box: mailbox.Mailbox) -> list[str]:  # type: ignore[type-arg]
    return sorted(str(m["Subject"]) for m in box)


def run_reader(*args: str, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "monomail.reader", *args], cwd=cwd, input=stdin.decode(),
                          capture_output=True, text=True, timeout=8, check=False)
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc


class Script(io.StringIO):
    """stdin for in-process sessions: lines, and callables run when reached."""

    def __init__(self, *items: str | Callable[[], None]) -> None:
        super().__init__()
        self.items = list(items)

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        while self.items:
            item = self.items.pop(0)
            if callable(item):
                item()
                continue
            return item + "\n"
        return ""


def session(args: list[str], *lines: str | Callable[[], None], submit: reader.Submit | None = None,
            ) -> tuple[int, str]:
    out = io.StringIO()
    rc = reader.main(args, None, submit=submit, stdin=Script(*lines), stdout=out)
    assert "Traceback" not in out.getvalue()
    return rc, out.getvalue()


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./monomail.toml picked up by accident


# --------------------------------------------------------------------------- summary and -p


def test_summary_of_an_mbox(tmp_path: Path):
    box = make_mbox(tmp_path / "box", 2)
    add_mbox(box, "old", extra="Status: RO\n")
    add_mbox(box, "seen", extra="Status: O\n")
    before = box.read_bytes()
    proc = run_reader("-H", "-f", str(box), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f'"{box}": 4 messages 2 new 1 unread'
    raw = message(0)
    size = f"{len(raw.splitlines())}/{len(raw)}"
    assert re.fullmatch(rf">N   1 Sender 0 +\w\w\w Nov 1[45] \d\d:\d\d +{size}  hello 0", lines[1]), lines[1]
    assert re.fullmatch(r" N   2 Sender 1 .* hello 1", lines[2])
    assert re.fullmatch(r"     3 Sender old .* hello old", lines[3])
    assert re.fullmatch(r" U   4 Sender seen .* hello seen", lines[4])
    assert len(lines) == 5
    assert box.read_bytes() == before  # -H only reads


def test_summary_of_a_maildir_and_its_flags(tmp_path: Path):
    names = make_maildir(tmp_path / "md", 3)
    os.rename(tmp_path / "md/new" / names[1], tmp_path / "md/cur" / f"{names[1]}:2,S")
    os.rename(tmp_path / "md/new" / names[2], tmp_path / "md/cur" / f"{names[2]}:2,")
    proc = run_reader("-H", "-f", str(tmp_path / "md"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(": 3 messages 1 new 1 unread")
    assert [line[:6] for line in lines[1:]] == [">N   1", "     2", " U   3"]
    assert "Sender 1" in lines[2] and "hello 2" in lines[3]


def test_print_all_shows_messages_as_sent_and_changes_nothing(tmp_path: Path):
    box = make_mbox(tmp_path / "box", 2)
    before = box.read_bytes()
    proc = run_reader("-p", "-f", str(box), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Message 1:\nReturn-Path: <s0@example.test>\n")
    assert "\nFrom body 0\n>From quoted 0\nlast line 0\n" in proc.stdout  # mboxrd quoting undone
    assert "Message 2:\n" in proc.stdout and "Subject: hello 1\n" in proc.stdout
    assert box.read_bytes() == before

    md = tmp_path / "md"
    mailstore.deliver_maildir(md, [b"Subject: =?utf-8?q?caf=C3=A9?=\nContent-Type: text/plain; charset=utf-8\n"
                                   b"Content-Transfer-Encoding: base64\n\nY2Fmw6kgY3LDqG1lCg==\n\x1b[2J"])
    proc = run_reader("-p", "-f", str(md), cwd=tmp_path)
    assert "café crème" in proc.stdout  # one text part: transfer encoding undone
    assert "\x1b" not in proc.stdout  # no terminal control sequences from mail
    assert os.listdir(md / "cur") == []


def test_user_mailbox_from_the_config(tmp_path: Path):
    cfg = write_config(tmp_path)
    make_mbox(tmp_path / "mail" / "bob", 2)
    proc = run_reader("-c", str(cfg), "-u", "bob", "-H", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f'"{tmp_path / "mail" / "bob"}": 2 messages 2 new'
    proc = run_reader("-c", str(cfg), "-u", "alice", "-H", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, f"No mail in {tmp_path / 'mail' / 'alice'}\n")
    proc = run_reader("-c", str(cfg), "-u", "nobody", cwd=tmp_path)
    assert proc.returncode == 2 and "no user 'nobody'" in proc.stderr
    proc = run_reader("-c", str(tmp_path / "missing.toml"), "-u", "bob", cwd=tmp_path)
    assert proc.returncode == 2 and "config error" in proc.stderr
    proc = run_reader("-u", "bob", "-f", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    proc = run_reader("-f", str(tmp_path), cwd=tmp_path)  # a folder that is no Maildir
    assert proc.returncode == 1 and "neither a file nor a Maildir" in proc.stderr


# --------------------------------------------------------------------------- output cut short (| head)


def big_mbox(path: Path, n: int, body_lines: int = 0) -> Path:
    """``n`` messages written in one go (no lock or fsync per message: quick)."""
    filler = "".join(f"filler line {j}\n" for j in range(body_lines)).encode()
    path.write_bytes(b"".join(mailstore.from_line(f"s{i}@example.test", WHEN) + mailstore.mbox_quote(message(i))
                              + filler + b"\n" for i in range(n)))
    return path


@pytest.fixture(params=["buffered", "unbuffered"])
def output_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Both ways Python may write stdout: buffered (the usual: the interpreter's last flush
    at exit meets the closed pipe) and unbuffered (``PYTHONUNBUFFERED``: every write does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return env if request.param == "buffered" else {**env, "PYTHONUNBUFFERED": "1"}


def through_head(args: list[str], cwd: Path, env: dict[str, str], stdin: bytes = b"") -> tuple[int, str, str]:
    """``python -m monomail mail ARGS < stdin | head -1`` on a real pipe: (the reader's exit
    status, what head printed, the reader's stderr)."""
    with (cwd / "stdin").open("w+b") as inp:
        inp.write(stdin)
        inp.seek(0)
        reader_proc = subprocess.Popen([sys.executable, "-m", "monomail", "mail", *args], cwd=cwd, stdin=inp,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert reader_proc.stdout is not None and reader_proc.stderr is not None
        head = subprocess.run(["head", "-1"], stdin=reader_proc.stdout, capture_output=True, timeout=8, check=True)
        reader_proc.stdout.close()
        err = reader_proc.stderr.read().decode()
        return reader_proc.wait(timeout=8), head.stdout.decode(), err


@pytest.mark.parametrize(("args", "stdin", "first"), [
    (["-H"], b"", "messages 2000 new"),
    (["-p"], b"", "Message 1:"),
    ([], b"p *\nd 1\nq\n", "messages 2000 new"),  # a session: the summary alone fills the pipe
])
def test_output_cut_short_by_head_ends_quietly(tmp_path: Path, output_env: dict[str, str], args: list[str],
                                               stdin: bytes, first: str):
    """Defect 15: ``monomail mail | head`` ended with a broken-pipe error. Now it stops
    quietly with 141 (128 + SIGPIPE, as the shell reports for mailx or less) and, in a
    session, changes nothing."""
    box = big_mbox(tmp_path / "box", 2000)
    before = box.read_bytes()
    rc, out, err = through_head(["-f", str(box), *args], tmp_path, output_env, stdin)
    assert first in out
    assert err == ""  # no traceback, no "Broken pipe", no "Exception ignored"
    assert rc == 141
    assert box.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "stdin"]  # no lock or journal left


def test_a_session_whose_output_goes_away_mid_command_changes_nothing(tmp_path: Path, output_env: dict[str, str]):
    box = big_mbox(tmp_path / "box", 3, body_lines=10_000)  # a short summary, then p * prints ~600 kB
    before = box.read_bytes()
    rc, out, err = through_head(["-f", str(box)], tmp_path, output_env, b"p *\nd 1\nd 2\nq\n")
    assert (rc, err) == (141, "")
    assert out == f'"{box}": 3 messages 3 new\n'
    assert box.read_bytes() == before


@pytest.mark.parametrize("args", [["--help"], ["-H", "-f", "box"], ["-f", "missing"]])
def test_output_closed_before_the_first_line(tmp_path: Path, output_env: dict[str, str], args: list[str]):
    """The pipe's reader is gone before anything is written (``| true``): still no traceback."""
    make_mbox(tmp_path / "box", 2)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "monomail", "mail", *args], cwd=tmp_path, stdin=subprocess.DEVNULL,
                              stdout=write_end, stderr=subprocess.PIPE, env=output_env, timeout=8, check=False)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")


# --------------------------------------------------------------------------- commands in-process


def test_bad_commands_get_clear_errors_and_x_changes_nothing(tmp_path: Path):
    box = make_mbox(tmp_path / "box", 3)
    before = box.read_bytes()
    rc, out = session(["-f", str(box)], "frob", "p 9", "d x", "s", "r 1-2", "u", "d 2", "p 2", "3-1",
                      "s 1 /nonexistent/dir/file", "p 'unbalanced", "p 3", "", "-", "-", "-", "x")
    assert rc == 0
    for text in ("Unknown command: 'frob' (? for help)", "No message 9: messages are 1 to 3.",
                 "not a message number: 'x'", "usage: s [MSGS] FILE", "reply to one message at a time",
                 "No deleted message to undelete.", "Message 2 is deleted (u 2 undeletes it).",
                 "/nonexistent/dir: no such folder", "cannot parse that line", "At EOF", "No previous message"):
        assert text in out, text
    assert "Message 3:" in out and "Message 1:" in out
    assert box.read_bytes() == before


def test_end_of_input_quits_like_q(tmp_path: Path):
    box = make_mbox(tmp_path / "box", 3)
    rc, out = session(["-f", str(box)], "d 1-2")
    assert rc == 0 and out.rstrip().endswith(f"Held 1 message in {box}, deleted 2")
    assert subjects(mailbox.mbox(box)) == ["hello 2"]
    assert list(mailbox.mbox(box))[0]["Status"] is None  # listed, not read: still new


@pytest.mark.parametrize(("raw", "marked"), [
    (b"Subject: odd\nX-Broken header line\n\nthe body\n",  # a line that is no field begins the body
     b"Subject: odd\nStatus: RO\nX-Broken header line\n\nthe body\n"),
    (b"Subject: no body at all\nX-Last: field\n", b"Subject: no body at all\nX-Last: field\nStatus: RO\n"),
])
def test_a_read_mark_goes_into_the_header_section(tmp_path: Path, raw: bytes, marked: bytes):
    """``Status: RO`` is added as the last field of the header section as RFC 5322 draws
    it (``message.split_header``), where every mbox reader finds it, not after a line
    that already began the body."""
    box = tmp_path / "box"
    mailstore.deliver_mbox(box, [("a@example.test", WHEN, [raw])], lock_timeout=5)
    rc, out = session(["-f", str(box)], "p 1", "q")
    assert rc == 0 and f"Held 1 message in {box}" in out
    assert box.read_bytes() == mailstore.from_line("a@example.test", WHEN) + marked + b"\n"
    assert [m["Status"] for m in mailbox.mbox(box)] == ["RO"]
    rc, out = session(["-H", "-f", str(box)])
    assert re.search(r"^>    1 a@example.test ", out, re.M), out  # read: no N or U marker


def test_reply_goes_through_the_submit_hook(tmp_path: Path):
    cfg = write_config(tmp_path)
    box = tmp_path / "mail" / "bob"
    add_mbox(box, 0)
    add_mbox(box, 1, extra="References: <root@example.test>\n")
    sent: list[tuple[str, list[str], bytes]] = []
    rc, out = session(["-c", str(cfg), "-u", "bob"], "r 2", "Thanks, noted.", "", "bye", ".", "x",
                      submit=lambda s, r, m: sent.append((s, list(r), m)))
    assert rc == 0
    assert "To: s1@example.test\nSubject: Re: hello 1\n" in out and "Sent to s1@example.test." in out
    [(sender, rcpts, data)] = sent
    assert (sender, rcpts) == ("bob@example.test", ["s1@example.test"])
    msg = message_from_bytes(data, policy=policy.default)
    assert msg["To"] == "s1@example.test" and msg["From"] == "bob@example.test"
    assert msg["Subject"] == "Re: hello 1"
    assert msg["In-Reply-To"] == "<m1@example.test>"
    assert msg["References"] == "<root@example.test> <m1@example.test>"
    assert msg["Message-ID"] and msg["Date"]
    assert msg.get_content() == "Thanks, noted.\n\nbye\n"
    assert b"\r" not in data


def test_reply_prefers_reply_to_and_keeps_one_re(tmp_path: Path):
    box = tmp_path / "box"
    add_mbox(box, 0, extra="Reply-To: List <list@example.test>\n")
    mailstore.deliver_mbox(box, [("", WHEN, [b"From: x@example.test\nSubject: Re: again\n\nhi\n"])], 5)
    sent: list[bytes] = []
    rc, _ = session(["-f", str(box)], "r 1", "a", ".", "r 2", "b", "x", submit=lambda s, r, m: sent.append(m))
    assert rc == 0 and len(sent) == 2  # the second body ended at end of input
    first, second = (message_from_bytes(m, policy=policy.default) for m in sent)
    assert first["To"] == "list@example.test" and first["Subject"] == "Re: hello 0"
    assert second["To"] == "x@example.test" and second["Subject"] == "Re: again"
    assert second["In-Reply-To"] is None


def test_mail_command_and_a_failing_submit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    box = make_mbox(tmp_path / "box", 1)
    sent: list[tuple[list[str], bytes]] = []
    rc, out = session(["-f", str(box)], "m carol@example.test dave", "Lunch?", "At noon.", ".", "m bad<addr", "x",
                      submit=lambda s, r, m: sent.append((list(r), m)))
    assert rc == 0 and "not an address: 'bad<addr'" in out
    [(rcpts, data)] = sent
    msg = message_from_bytes(data, policy=policy.default)
    assert rcpts == ["carol@example.test", "dave"] and msg["To"] == "carol@example.test, dave"
    assert msg["Subject"] == "Lunch?" and msg.get_content() == "At noon.\n"

    monkeypatch.setenv("DEAD", str(tmp_path / "dead.letter"))

    def refuse(sender: str, rcpts: object, data: bytes) -> None:
        raise reader.ReaderError("monomail sendmail exited 75: queue unavailable")

    rc, out = session(["-f", str(box)], "r", "keep me", ".", "x", submit=refuse)
    assert f"not sent: monomail sendmail exited 75: queue unavailable; saved in {tmp_path / 'dead.letter'}" in out
    [dead] = mailbox.mbox(tmp_path / "dead.letter")
    assert dead["Subject"] == "Re: hello 0" and dead.get_payload() == "keep me\n"


def test_default_submit_runs_monomail_sendmail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The default hook's command line, with a stand-in ``python`` that records it."""
    record = tmp_path / "argv"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$MONOMAIL_CONFIG\" \"$@\" > {record}\ncat >> {record}\n"
                    "exit ${FAKE_RC:-0}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.delenv("MONOMAIL_CONFIG", raising=False)
    reader.sendmail_submit("bob@example.test", ["a@example.test", "-oi"], b"Subject: x\n\nbody\n")
    assert record.read_text() == "\n-m\nmonomail\nsendmail\n-i\n--\na@example.test\n-oi\nSubject: x\n\nbody\n"

    cfg = write_config(tmp_path)  # a session's default hook names the session's config
    add_mbox(tmp_path / "mail" / "bob", 0)
    rc, out = session(["-c", str(cfg), "-u", "bob"], "r", "hi", ".", "x")
    assert rc == 0 and "Sent to s0@example.test." in out
    assert record.read_text().startswith(f"{cfg}\n-m\nmonomail\nsendmail\n-i\n--\ns0@example.test\n")
    monkeypatch.setenv("FAKE_RC", "75")
    with pytest.raises(reader.ReaderError, match="exited 75"):
        reader.sendmail_submit("bob@example.test", ["a@example.test"], b"x\n")


def test_an_mbox_rewritten_by_someone_else_is_left_alone(tmp_path: Path):
    box = make_mbox(tmp_path / "box", 3)
    msgs = mailbox.mbox(box)

    def other_reader(remove: bool) -> Callable[[], None]:  # another program rewrites the mbox meanwhile
        def run() -> None:
            msgs.lock()
            if remove:
                msgs.remove(msgs.keys()[0])
            else:  # marks message 1 read: the file gets longer, its first bytes stay the same
                m = msgs[msgs.keys()[0]]
                m.set_flags("RO")
                msgs[msgs.keys()[0]] = m
            msgs.flush()
            msgs.unlock()
        return run

    for remove, left in ((False, ["hello 0", "hello 1", "hello 2"]), (True, ["hello 1", "hello 2"])):
        rc, out = session(["-f", str(box)], "p 3", "d 2", other_reader(remove), "q")
        changed = box.read_bytes()
        assert rc == 1
        assert "was changed by another program while you read it; nothing was written" in out
        assert subjects(mailbox.mbox(box)) == left and box.read_bytes() == changed
        assert not list(tmp_path.glob("box.*"))  # no journal, no lock left


def test_q_waits_for_a_locked_mbox_then_offers_x(tmp_path: Path):
    cfg = write_config(tmp_path, local={"lock_timeout": "0.2s"})
    box = make_mbox(tmp_path / "mail" / "bob", 2)
    before = box.read_bytes()
    lock = box.with_name("bob.lock")
    def foreign_lock() -> None:
        lock.write_text("0\n")  # a foreign dot-lock with no pid: honoured

    rc, out = session(["-c", str(cfg), "-u", "bob"], "d 1", foreign_lock, "q", "x")
    assert rc == 0 and "locked by another program; q tries again, x quits without changes" in out
    assert box.read_bytes() == before


# --------------------------------------------------------------------------- on a real terminal


class Terminal:
    """``monomail mail`` in a tmux pane: type lines, read the screen."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="mmtty", dir="/tmp"))  # short: socket paths are limited
        self.sock = str(self.dir / "s")
        self.rc_file = self.dir / "rc"
        conf = self.dir / "tmux.conf"
        conf.write_text("set -g history-limit 20000\nset -g remain-on-exit on\n")
        command = (f"cd {shlex.quote(str(cwd))} && {shlex.join([sys.executable, '-m', 'monomail.reader', *args])}"
                   f"; echo $? > {self.rc_file}")
        self.tmux("-f", str(conf), "new-session", "-d", "-x", "200", "-y", "50", command)
        self.wait_prompt(0)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True, timeout=5,
                              check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-20000")

    def prompts(self) -> int:
        return sum(1 for line in self.screen().splitlines() if line == "?" or line.startswith("? "))

    def wait(self, ready: Callable[[], bool], what: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")
            time.sleep(0.03)

    def wait_prompt(self, seen: int) -> None:
        self.wait(lambda: self.prompts() > seen and self.screen().rstrip().splitlines()[-1] == "?", "the prompt")

    def type(self, line: str) -> None:
        if line:
            self.tmux("send-keys", "-t", "0", "-l", line)
        self.tmux("send-keys", "-t", "0", "Enter")

    def cmd(self, line: str) -> str:
        """Type a command, wait for the next prompt, return what it printed."""
        before = self.screen()
        n = self.prompts()
        self.type(line)
        self.wait_prompt(n)
        after = self.screen()
        return after[len(before.rstrip()):]

    def quit(self, line: str = "q") -> tuple[int, str]:
        self.type(line)
        self.wait(lambda: self.rc_file.exists() and self.rc_file.read_text().strip() != "", "the reader to exit")
        return int(self.rc_file.read_text()), self.screen()

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=5, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def start(args: list[str], cwd: Path) -> Terminal:
        t = Terminal(args, cwd)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def test_mbox_session_on_a_terminal(tmp_path: Path, terminal: Callable[..., Terminal]):
    box = make_mbox(tmp_path / "box", 3)
    original = {str(m["Subject"]): m.as_bytes() for m in mailbox.mbox(box)}
    t = terminal(["-f", str(box)], tmp_path)
    assert f'"{box}": 3 messages 3 new' in t.screen()
    out = t.cmd("h")
    assert re.search(r"^>N   1 Sender 0 .* hello 0$", out, re.M) and " N   3 Sender 2 " in out
    out = t.cmd("")  # Enter: the current message
    assert "Message 1:" in out and "\nFrom body 0\n>From quoted 0\n" in out
    assert "Message 3:" in t.cmd("3")
    t.cmd("d 2")
    assert '"saved.mbox": appended 1 message' in t.cmd("s saved.mbox")
    out = t.cmd("?")
    assert "x               quit without changing the mailbox" in out
    out = t.cmd("h")
    assert re.search(r"^ D   2 Sender 1 ", out, re.M) and re.search(r"^>    3 Sender 2 ", out, re.M)
    rc, screen = t.quit()
    assert rc == 0 and f"Held 2 messages in {box}, deleted 1" in screen
    kept = list(mailbox.mbox(box))
    assert [m["Subject"] for m in kept] == ["hello 0", "hello 2"]
    assert [m["Status"] for m in kept] == ["RO", "RO"]
    assert kept[1].get_payload() == ">From body 2\n>>From quoted 2\nlast line 2\n"  # quoting kept
    [saved] = mailbox.mbox(tmp_path / "saved.mbox")
    assert saved.as_bytes() == original["hello 2"] and saved.get_from().startswith("s2@example.test ")
    assert not list(tmp_path.glob("box.*"))


def test_maildir_session_on_a_terminal(tmp_path: Path, terminal: Callable[..., Terminal]):
    md = tmp_path / "md"
    names = make_maildir(md, 3)
    t = terminal(["-f", str(md)], tmp_path)
    assert "3 messages 3 new" in t.screen()
    assert "Message 1:" in t.cmd("p 1")
    t.cmd("d 2")
    assert "appended 1 message" in t.cmd("s 1 saved")
    out = t.cmd("h")
    assert re.search(r"^>    1 Sender 0 ", out, re.M) and " D   2 " in out and " N   3 " in out
    rc, screen = t.quit()
    assert rc == 0 and f"Held 2 messages in {md}, deleted 1" in screen
    assert sorted(os.listdir(md / "cur")) == [f"{names[0]}:2,S"]
    assert sorted(os.listdir(md / "new")) == [names[2]]  # untouched: still new
    box = mailbox.Maildir(md, create=False)
    assert subjects(box) == ["hello 0", "hello 2"]
    assert {str(m["Subject"]): m.get_flags() for m in box} == {"hello 0": "S", "hello 2": ""}
    assert (md / "cur" / f"{names[0]}:2,S").read_bytes() == message(0)
    [saved] = mailbox.mbox(tmp_path / "saved")
    assert saved["Subject"] == "hello 0"


def test_x_on_a_terminal_changes_nothing(tmp_path: Path, terminal: Callable[..., Terminal]):
    box = make_mbox(tmp_path / "box", 2)
    before = box.read_bytes()
    t = terminal(["-f", str(box)], tmp_path)
    t.cmd("p 1")
    t.cmd("d 2")
    rc, _ = t.quit("x")
    assert rc == 0 and box.read_bytes() == before


# --------------------------------------------------------------------------- racing the server


def test_mail_delivered_into_an_open_mbox_session_survives_q(tmp_path: Path, terminal: Callable[..., Terminal]):
    box = make_mbox(tmp_path / "box", 3)
    t = terminal(["-f", str(box)], tmp_path)
    t.cmd("d 1")
    t.cmd("p 2")
    late = add_mbox(box, "late")  # the server delivers while the session is open
    rc, screen = t.quit()
    assert rc == 0 and f"Held 3 messages in {box}, deleted 1 (1 arrived while you read)" in screen
    data = box.read_bytes()
    assert data.endswith(late) and data.count(b"Subject: hello late\n") == 1
    msgs = list(mailbox.mbox(box))
    assert [m["Subject"] for m in msgs] == ["hello 1", "hello 2", "hello late"]
    assert [m["Status"] for m in msgs] == ["RO", None, None]


def test_deliveries_during_the_rewrite_itself_are_kept(tmp_path: Path, terminal: Callable[..., Terminal]):
    box = make_mbox(tmp_path / "box", 3)
    t = terminal(["-f", str(box)], tmp_path)
    t.cmd("d 1-2")
    t.cmd("p 3")
    stop = threading.Event()
    delivered: list[bytes] = []

    def server() -> None:
        n = 0
        while not stop.is_set() or n < 10:
            add_mbox(box, f"late{n}")
            delivered.append(f"hello late{n}".encode())
            n += 1

    thread = threading.Thread(target=server)
    thread.start()
    try:
        time.sleep(0.05)
        rc, _ = t.quit()
    finally:
        stop.set()
        thread.join(8)
    assert rc == 0
    msgs = list(mailbox.mbox(box))
    assert [m["Subject"] for m in msgs] == ["hello 2"] + [d.decode() for d in delivered]
    assert msgs[0]["Status"] == "RO"
    for i, m in enumerate(msgs[1:]):
        assert m.as_bytes().endswith(f"\n>From body late{i}\n>>From quoted late{i}\nlast line late{i}\n".encode())


def test_mail_delivered_into_an_open_maildir_session_survives_q(tmp_path: Path, terminal: Callable[..., Terminal]):
    md = tmp_path / "md"
    names = make_maildir(md, 3)
    t = terminal(["-f", str(md)], tmp_path)
    t.cmd("d 1")
    t.cmd("p 2")
    late = mailstore.deliver_maildir(md, [message("late")])
    rc, screen = t.quit()
    assert rc == 0 and f"Held 3 messages in {md}, deleted 1 (1 arrived while you read)" in screen
    assert sorted(os.listdir(md / "new")) == sorted([names[2], late])
    assert os.listdir(md / "cur") == [f"{names[1]}:2,S"]
    assert (md / "new" / late).read_bytes() == message("late")
    assert subjects(mailbox.Maildir(md, create=False)) == ["hello 1", "hello 2", "hello late"]


def test_maildir_flags_changed_by_another_client_are_kept(tmp_path: Path):
    md = tmp_path / "md"
    names = make_maildir(md, 2)

    def other_client() -> None:  # moves message 1 to cur/ and flags it, as another MUA would
        os.rename(md / "new" / names[0], md / "cur" / f"{names[0]}:2,F")
        os.unlink(md / "new" / names[1])

    rc, out = session(["-f", str(md)], "p 1", "p 2", other_client, "q")
    assert rc == 0 and "warning: message 2 was removed by another program" in out
    assert os.listdir(md / "cur") == [f"{names[0]}:2,FS"]


# --------------------------------------------------------------------------- a reader killed mid-rewrite

KILLED = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from monomail import mailstore, mboxrewrite, reader
    path, case, step = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    mboxrewrite.fault = lambda name: os._exit(9) if name == step else None
    folder = reader.MboxFolder(path, 5)
    msgs = folder.load()
    if case == "grow":  # read marks only: the file gets longer
        msgs[1].read_now = msgs[2].read_now = True
    else:  # a deletion: shorter
        msgs[0].deleted = True
        msgs[2].read_now = True
    item = ("late1@example.test", @WHEN@, [mailstore.mbox_quote(b"Subject: arrived meanwhile\\n\\nFrom x\\n")])
    mailstore.deliver_mbox(path, [item], 5)  # arrives during the session: kept after the rewrite
    folder.commit(msgs)
    sys.exit(0 if step == "none" else 3)
""").replace("@WHEN@", repr(WHEN))

GROW_STEPS = ["journal", "dotlock", "padded", "boundary", "written", "done"]
SHRINK_STEPS = ["journal", "written", "boundary", "dotlock", "truncated", "done"]


def rewrite(path: Path, case: str, step: str) -> int:
    return subprocess.run([sys.executable, "-c", KILLED, str(path), case, step], capture_output=True,
                          timeout=8, check=False).returncode


@pytest.mark.parametrize(("case", "step", "torn"), [
    *(("grow", s, False) for s in GROW_STEPS),
    *(("shrink", s, False) for s in SHRINK_STEPS),
    ("shrink", "journal", True),  # killed while writing the new content over the old
    ("grow", "dotlock", True),  # killed while extending the file
    ("grow", "boundary", True),  # killed while writing the new content
])
def test_a_reader_killed_mid_rewrite_loses_nothing(tmp_path: Path, case: str, step: str, torn: bool):
    expected = make_mbox(tmp_path / "expected", 3)
    box = tmp_path / "box"
    shutil.copy(expected, box)
    assert rewrite(expected, case, "none") == 0
    add_mbox(expected, "after")

    assert rewrite(box, case, step) == 9  # killed: the dot-lock and (but for "done") the journal stay
    assert box.with_name("box.lock").exists()
    journal = mboxrewrite.journal_path(box)
    assert journal.exists() == (step != "done")
    if torn:
        journal = mboxrewrite.read_journal(box)
        start, region = journal.start, journal.region
        size = box.stat().st_size
        with box.open("r+b") as f:
            if step == "dotlock":  # a part of the newline padding
                f.seek(size)
                f.write(b"\n" * ((start + len(region) - size) // 2))
            else:  # part of the new content, then junk
                f.seek(start)
                junk = (region[: (size - start) // 3] + b"\nFrom junk\n" + b"x" * size)[: size - start]
                f.write(junk)
    add_mbox(box, "after")  # the server delivers before anyone looks: it meets the dead reader's dot-lock
    assert mboxrewrite.finish_interrupted_rewrite(box, 5) == (step != "done")
    assert box.read_bytes() == expected.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "expected"]
    msgs = list(mailbox.mbox(box))
    assert [m["Subject"] for m in msgs] == (
        ["hello 0", "hello 1", "hello 2", "arrived meanwhile", "hello after"] if case == "grow"
        else ["hello 1", "hello 2", "arrived meanwhile", "hello after"])


def test_the_reader_finishes_an_interrupted_rewrite_when_it_opens_the_mbox(tmp_path: Path):
    box = make_mbox(tmp_path / "box", 3)
    assert rewrite(box, "shrink", "written") == 9
    proc = run_reader("-H", "-f", str(box), cwd=tmp_path)
    assert proc.returncode == 0
    assert f"finished an interrupted rewrite of {box}" in proc.stderr
    assert proc.stdout.splitlines()[1:] == [
        line for line in proc.stdout.splitlines()[1:] if "hello 0" not in line]
    assert [m["Subject"] for m in mailbox.mbox(box)] == ["hello 1", "hello 2", "arrived meanwhile"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box"]


def test_a_journal_half_written_by_a_killed_reader_is_removed(tmp_path: Path):
    """A kill while the journal itself is written (before its rename) leaves only its
    temporary file: the mbox is untouched, and the next opening removes the leftover."""
    from monomail import safeio

    box = make_mbox(tmp_path / "box", 2)
    before = box.read_bytes()
    leftover = tmp_path / f"{safeio.TMP_PREFIX}box{mboxrewrite.JOURNAL_SUFFIX}.99999.1"  # a dead process's
    leftover.write_bytes(b"monomail-rewrite start=0 boundary=")
    proc = run_reader("-H", "-f", str(box), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box"]
    assert box.read_bytes() == before


@pytest.mark.parametrize("user", ["alice", "bob"])  # alice: Maildir, bob: mbox (tests/conftest.py)
def test_the_server_delivers_while_a_terminal_session_is_open(
    tmp_path: Path, terminal: Callable[..., Terminal], serve: Callable[..., Any], user: str
):
    """Acceptance: the reader on a pseudo-terminal lists, reads, deletes and saves while the
    real server delivers a new message over SMTP into the same mailbox; nothing is lost."""
    server = serve()

    def deliver(subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
            assert s.sendmail("x@outside.test", [f"{user}@example.test"],
                              f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode()) == {}

    for i in range(3):
        deliver(f"early {i}")
    path = server.config.users[user].path
    t = terminal(["-f", str(path)], tmp_path)
    assert "early 0" in t.cmd("h") and "early 2" in t.screen()
    assert "body of early 1" in t.cmd("2")
    t.cmd("d 1")
    assert "appended 1 message" in t.cmd("s saved.mbox")
    deliver("arrived during the session")  # the server writes into the open mailbox
    rc, screen = t.quit()
    assert rc == 0, screen
    if user == "bob":
        kept = [m["Subject"] for m in mailbox.mbox(path)]
    else:
        box = mailbox.Maildir(path, factory=None, create=False)
        kept = sorted(message_from_bytes(box.get_bytes(k))["Subject"] for k in box.iterkeys())
    assert sorted(kept) == ["arrived during the session", "early 1", "early 2"]
    assert [m["Subject"] for m in mailbox.mbox(tmp_path / "saved.mbox")] == ["early 1"]
