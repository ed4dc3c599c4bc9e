"""monomail's procmail engine against the real procmail, case by case.

Every ``tests/procmail_corpus/*.rc`` runs on every message in
``tests/procmail_corpus/messages/`` (or those its ``# messages:`` line names), twice,
at the same HOME path: once with ``/usr/bin/procmail``, once with `monomail.procmail`
and a file-writing executor built on `monomail.mailstore` (so the on-disk formats
are monomail's). Then the two HOME trees must hold the same files and folders, the
same messages in each (parsed with the stdlib ``mailbox`` module; From_ line dates
and Maildir file names ignored), the same forwards, and the same verdict (procmail's
exit status 0 = delivered).

How procmail runs, as root and without a user account::

    procmail -Y -f SENDER -m HOME=... LOGNAME=alice SENDER=... MAILDIR=$HOME \\
        DEFAULT=$HOME/Mailbox SENDMAIL=fake-sendmail SENDMAILFLAGS=-oi VERBOSE=off \\
        CORPUS=tests/procmail_corpus /abs/path/case.rc < message

``-m`` makes procmail a general-purpose filter of the named rcfile (no /etc/procmailrc,
no setuid games, no ORGMAIL fallback); ``-f`` makes it generate the From_ line the
engine also puts in front of the message; ``-Y`` stops it rewriting Content-Length.
The fake sendmail records its argv and stdin. Both procmail's stdout and stderr are
pipes, so waiting for their EOF also waits for clones (``c`` on a block) to finish.

Speed: procmail sleeps one second after its first write to a new mbox file (its NFS
atime hack, ``ssleep(1)`` in mailfold.c). So all procmail runs happen up front, in
parallel, and when a C compiler is around, a non-setuid copy of procmail runs with
an ``LD_PRELOAD`` shim whose ``sleep()`` returns at once (the installed binary is
setuid, which makes the loader ignore LD_PRELOAD). Each case gets its own directory
and HOME; procmail's HOME tree is recorded and removed, then monomail runs at the
same HOME path.

Case file directives (comment lines): ``# messages: plain list`` limits the messages;
``# default: Maildir/`` sets DEFAULT (relative to HOME); ``# differs: from-line``
marks a known difference (a file procmail writes without a From_ line, where
monomail's mbox writer always writes one) and compares such files with From_ lines
removed. ``*.log`` files are compared by existence only.
"""

from __future__ import annotations

import mailbox
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from monomail import mailstore, procmail

PROCMAIL = Path("/usr/bin/procmail")
CORPUS = Path(__file__).resolve().parent / "procmail_corpus"
MESSAGES = sorted((CORPUS / "messages").glob("*.eml"))
CASES = sorted(CORPUS.glob("*.rc"))
WHEN = 1_725_357_600.0
FROM_LINE = re.compile(rb"^From (\S+) +\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n", re.MULTILINE)

pytestmark = pytest.mark.skipif(not PROCMAIL.exists(), reason="procmail is not installed (apt-get install procmail)")


def directives(case: Path) -> dict[str, str]:
    out = {}
    for line in case.read_text().splitlines():
        m = re.match(r"#\s*(messages|default|differs):\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def pairs() -> list[tuple[Path, Path]]:
    out = []
    for case in CASES:
        wanted = directives(case).get("messages", "").split()
        for msg in MESSAGES:
            if not wanted or msg.stem in wanted:
                out.append((case, msg))
    return out


def envelope_sender(message: bytes) -> str:
    m = re.match(rb"Return-Path: <([^>]*)>", message)
    return m.group(1).decode() if m else ""


class FileExecutor:
    """What monomail's delivery does, confined to HOME: mailstore writers, programs as
    argv (never a shell) with a timeout, forwards recorded."""

    def __init__(self, home: Path, sender: str) -> None:
        self.home = home
        self.sender = sender
        self.forwards: list[tuple[tuple[str, ...], bytes]] = []
        self.lines: list[str] = []

    def to_mbox(self, path: Path, message: bytes, lock: bool) -> None:
        real = procmail.confine(path, [self.home])
        mailstore.deliver_mbox(real, [(self.sender, WHEN, [mailstore.mbox_quote(message)])], 2.0)

    def to_maildir(self, path: Path, message: bytes) -> str:
        return mailstore.deliver_maildir(procmail.confine(path, [self.home]), [message])

    def forward(self, addresses: list[str], message: bytes) -> None:
        self.forwards.append((tuple(addresses), message))

    def pipe(self, argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
        proc = subprocess.run(argv, input=message, env=env, cwd=env["PWD"], timeout=5,
                              stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc.returncode, proc.stdout or b""

    def log(self, line: str) -> None:
        self.lines.append(line)


@dataclass
class ProcmailRun:
    home: Path
    default: str
    delivered: bool
    forwards: list[tuple[tuple[str, ...], bytes]]
    tree: dict[str, tuple]
    stderr: str


def procmail_command(tools: Path) -> tuple[list[str], dict[str, str]]:
    """procmail, made quick if possible (see the module docstring)."""
    env = {"PATH": "/usr/bin:/bin"}
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return [str(PROCMAIL)], env
    (tools / "nosleep.c").write_text("unsigned int sleep(unsigned int s) { (void)s; return 0; }\n")
    built = subprocess.run([cc, "-shared", "-fPIC", "-o", str(tools / "nosleep.so"), str(tools / "nosleep.c")],
                           capture_output=True)
    if built.returncode:
        return [str(PROCMAIL)], env
    copy = tools / "procmail"
    shutil.copyfile(PROCMAIL, copy)
    copy.chmod(0o755)
    return [str(copy)], {**env, "LD_PRELOAD": str(tools / "nosleep.so")}


def run_procmail(command: list[str], cmd_env: dict[str, str], case: Path, msg: Path, work: Path) -> ProcmailRun:
    work.mkdir(parents=True)
    home = work / "home"
    home.mkdir()
    message = msg.read_bytes()
    default = str(home / directives(case).get("default", "Mailbox"))
    fwd = work / "fwd"
    fake = work / "fake-sendmail"
    fake.write_text(f'#!/bin/sh\nd={fwd}\nmkdir -p "$d"\n'  # procmail may run several at once
                    'printf "%s\\n" "$@" > "$d/$$.argv"\ncat > "$d/$$.stdin"\n')
    fake.chmod(0o755)
    sender = envelope_sender(message)
    proc = subprocess.run(
        [*command, "-Y", "-f", sender or "MAILER-DAEMON", "-m", f"HOME={home}", "LOGNAME=alice",
         f"SENDER={sender}", f"MAILDIR={home}", f"DEFAULT={default}", f"SENDMAIL={fake}", "SENDMAILFLAGS=-oi",
         "VERBOSE=off", f"CORPUS={CORPUS}", str(case)],
        input=message, capture_output=True, timeout=60, cwd=home, env=cmd_env)
    forwards = []
    if fwd.exists():
        for argv in fwd.glob("*.argv"):
            args = argv.read_text().splitlines()
            assert args[0] == "-oi", args
            forwards.append((tuple(args[1:]), argv.with_suffix(".stdin").read_bytes()))
    tree = snapshot(home)
    shutil.rmtree(home)
    stderr = proc.stderr.decode(errors="replace")
    return ProcmailRun(home, default, proc.returncode == 0, sorted(forwards), tree, stderr)


@pytest.fixture(scope="session")
def procmail_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], ProcmailRun]:
    """procmail's results for every (case, message), all computed at once."""
    base = tmp_path_factory.mktemp("procmail")
    tools = base / "tools"
    tools.mkdir()
    command, cmd_env = procmail_command(tools)
    todo = pairs()
    with ThreadPoolExecutor(max_workers=64) as pool:
        runs = pool.map(lambda p: run_procmail(command, cmd_env, p[0], p[1], base / f"{p[0].stem}.{p[1].stem}"), todo)
        return {(case.stem, msg.stem): r for (case, msg), r in zip(todo, runs, strict=True)}


def run_engine(case: Path, message: bytes, home: Path, default: str) -> tuple[procmail.Result, FileExecutor]:
    sender = envelope_sender(message)
    ex = FileExecutor(home, sender)
    rc = procmail.parse(case.read_text(), str(case))
    env = {"HOME": str(home), "LOGNAME": "alice", "SENDER": sender, "MAILDIR": str(home), "DEFAULT": default,
           "CORPUS": str(CORPUS), "PATH": "/usr/bin:/bin"}
    result = procmail.run(rc, message, env, ex, allow_pipes=True, sender=sender, when=WHEN)
    return result, ex


def snapshot(home: Path) -> dict[str, tuple]:
    """Relative path → what is there: a Maildir's sorted message files, a file's bytes."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(home):
        d = Path(dirpath)
        if {"new", "cur", "tmp"} <= set(dirnames):
            msgs = sorted(p.read_bytes() for sub in ("new", "cur") for p in (d / sub).iterdir())
            out[str(d.relative_to(home)) + "/"] = ("maildir", msgs, sorted(os.listdir(d / "tmp")))
            dirnames[:] = [n for n in dirnames if n not in ("new", "cur", "tmp")]
        elif not dirnames and not filenames and d != home:
            out[str(d.relative_to(home)) + "/"] = ("dir",)
        for name in filenames:
            p = d / name
            out[str(p.relative_to(home))] = ("file", p.read_bytes())
    return out


Parsed = tuple[str, list[tuple[str, str]], bytes]


def parsed(msg: mailbox.Message) -> tuple[list[tuple[str, str]], bytes]:
    payload = msg.get_payload()
    body = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else repr(payload).encode()
    return msg.items(), body


def mbox_messages(data: bytes, tmp: Path) -> list[Parsed]:
    """The messages of an mbox file: (From_ line sender, headers, body)."""
    path = tmp / "parse.mbox"
    path.write_bytes(data)
    box = mailbox.mbox(path, create=False)
    try:
        return [((m.get_from() or "").split(" ")[0], *parsed(m)) for m in box]
    finally:
        box.close()
        path.unlink()


def maildir_messages(files: list[bytes]) -> list[Parsed]:
    return sorted(("", *parsed(mailbox.MaildirMessage(data))) for data in files)


def normalise(data: bytes, drop_from: bool) -> bytes:
    """From_ lines without their dates (or dropped altogether)."""
    return FROM_LINE.sub(b"" if drop_from else rb"From \1\n", data)


def compare(ours: dict[str, tuple], theirs: dict[str, tuple], tmp: Path, differs: str) -> list[str]:
    problems = []
    if sorted(ours) != sorted(theirs):
        problems.append(f"paths differ: procmail {sorted(theirs)} monomail {sorted(ours)}")
    for rel in sorted(set(ours) & set(theirs)):
        a, b = ours[rel], theirs[rel]
        if a[0] != b[0]:
            problems.append(f"{rel}: procmail made a {b[0]}, monomail a {a[0]}")
        elif a[0] == "maildir":
            if maildir_messages(a[1]) != maildir_messages(b[1]) or a[1] != b[1] or a[2] != b[2]:
                problems.append(f"{rel}: Maildir messages differ:\n procmail {b[1]!r}\n monomail {a[1]!r}")
        elif a[0] == "file" and not rel.endswith(".log"):
            mine, procmails = a[1], b[1]
            if procmails.startswith(b"From ") and mine.startswith(b"From "):
                pm, mm = mbox_messages(procmails, tmp), mbox_messages(mine, tmp)
                if pm != mm:
                    problems.append(f"{rel}: mbox messages differ:\n procmail {pm!r}\n monomail {mm!r}")
            drop = differs == "from-line" and not procmails.startswith(b"From ")
            if normalise(mine, drop) != normalise(procmails, drop):
                problems.append(f"{rel}: contents differ:\n procmail {procmails!r}\n monomail {mine!r}")
    return problems


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len(MESSAGES) >= 4


@pytest.mark.timeout(60)  # the first test also waits for the procmail runs
@pytest.mark.parametrize(("case", "msg"), pairs(), ids=lambda p: p.stem)
def test_same_as_procmail(case: Path, msg: Path, procmail_runs: dict[tuple[str, str], ProcmailRun],
                          tmp_path: Path) -> None:
    theirs = procmail_runs[(case.stem, msg.stem)]
    theirs.home.mkdir()
    result, ex = run_engine(case, msg.read_bytes(), theirs.home, theirs.default)
    ours = snapshot(theirs.home)
    problems = compare(ours, theirs.tree, tmp_path, directives(case).get("differs", ""))
    if sorted(ex.forwards) != theirs.forwards:
        problems.append(f"forwards differ:\n procmail {theirs.forwards!r}\n monomail {sorted(ex.forwards)!r}")
    if result.delivered != theirs.delivered:
        problems.append(f"delivered: procmail {theirs.delivered}, monomail {result.delivered}")
    assert not problems, "\n".join(problems + ["procmail stderr: " + theirs.stderr, "monomail: " + "; ".join(ex.lines)])
