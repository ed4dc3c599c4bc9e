"""One message's run through the recipes: its state, its log, its views of the message, its programs.

Job: `RunState`, everything a run holds and the services that read it without
deciding anything: the variables (procmail's defaults, then the caller's ``env``), the
message with its From_ line (procmail's ``-f sender``), the current directory
(MAILDIR), the log (`note`, `error`; LOGFILE append-only and re-confined to HOME at
every write; procmail's end-of-delivery abstract, procmailrc(5) LOGABSTRACT), the
areas conditions search (H with continued fields joined by a space, B, HB) and the
parts ``h``/``b`` select, ``$`` expansion (it is the `expand.Context`), and the one way
a program is started (`argv`, `run_test` for ``?``, `backquote`): words by procmail's
quoting, never a shell, only with ``allow_pipes`` (differences 1 and 2 in the package
docstring).

Not here: walking the rcfile and evaluating conditions (``engine``), delivering
(``actions``), the effects themselves (the caller's `Executor`).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import expand
from .executor import Executor, confine
from .message import layout, terminate
from .syntax import Rcfile, Statement


@dataclass
class Shared:
    """State shared by a run and its clones."""

    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    steps: int = 0
    clones: int = 0


@dataclass
class Frame:
    items: tuple[Statement, ...]
    pos: int
    kind: str  # "file" | "block"
    name: str
    ifdepth: int


class RunState:
    """The state of one pass over the rcfile for one message (a clone copies it)."""

    def __init__(self, rc: Rcfile, message: bytes, env: dict[str, str], executor: Executor,
                 read_file: Callable[[Path], str], allow_pipes: bool, sender: str, when: float,
                 deliver_default: bool) -> None:
        home = env.get("HOME", "")
        self.home = home
        self.vars: dict[str, str] = {
            "SHELL": "/bin/sh", "SHELLMETAS": "&|<>~;?*[", "SHELLFLAGS": "-c",
            "PATH": f"{home}/bin:/usr/local/bin:/usr/bin:/bin", "LOCKEXT": ".lock",
            "MSGPREFIX": "msg.", "SENDMAIL": "/usr/sbin/sendmail", "SENDMAILFLAGS": "-oi",
        }
        self.vars.update(env)
        self.vars.setdefault("MAILDIR", home)
        who = sender or env.get("SENDER", "")
        self.vars.setdefault("SENDER", who)
        who = re.sub(r"\s", "_", who) or "MAILER-DAEMON"
        if message.startswith(b"From "):
            self.mail = message
        else:
            self.mail = f"From {who}  {time.ctime(when)}\n".encode("utf-8", "surrogateescape") + message
        self.cwd = self.vars["MAILDIR"] or home or "/"
        self.executor = executor
        self.read_file = read_file
        self.allow_pipes = allow_pipes
        self.deliver_default = deliver_default
        self.frames = [Frame(rc.statements, 0, "file", rc.name, 0)]
        self.ifstack: list[tuple[bool, bool]] = []
        self.lastsucc = self.lastcond = self.prevcond = False
        self.delivered = False
        self.lastexit = 0
        self.logfile: Path | None = None
        self.shared = Shared()
        self.tag = ""
        self._lay_mail = b""
        self._lay: tuple[int, tuple[int, ...]] = (0, ())

    # ------------------------------------------------------------ bookkeeping

    def note(self, text: str) -> None:
        line = self.tag + text
        self.shared.actions.append(line)
        self.executor_log(line)

    def error(self, text: str) -> None:
        line = self.tag + text
        self.shared.actions.append(line)
        self.shared.errors.append(line)
        self.executor_log(line)
        self.logwrite(f"monomail: {line}\n")

    def executor_log(self, line: str) -> None:
        with contextlib.suppress(Exception):  # logging must never stop a delivery
            self.executor.log(line)

    def logwrite(self, text: str) -> None:
        """Append to LOGFILE (re-confined to HOME at each write, regular files only)."""
        if self.logfile is None:
            return
        try:
            real = confine(self.logfile, [Path(self.home)])
            fd = os.open(real, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o600)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError("not a regular file")
                os.write(fd, text.encode("utf-8", "surrogateescape"))
            finally:
                os.close(fd)
        except OSError as exc:
            path, self.logfile = self.logfile, None
            self.error(f"LOGFILE {path} not written: {exc}")

    def set_logfile(self, value: str) -> None:
        self.logfile = None
        if not value:
            return
        path = self.path(value)
        try:
            confine(path, [Path(self.home)])
        except (PermissionError, OSError) as exc:
            self.error(f"LOGFILE ignored: {exc}")
            return
        self.logfile = path

    # ------------------------------------------------------------ the message

    def body_offset(self) -> int:
        if self._lay_mail is not self.mail:
            self._lay, self._lay_mail = layout(self.mail), self.mail
        return self._lay[0]

    def area(self, kind: str) -> bytes:
        """The text a condition searches: H (continued fields joined), B, or HB."""
        body = self.body_offset()
        if kind == "B":
            return self.mail[body:]
        text = bytearray(self.mail if kind == "HB" else self.mail[:body])
        for q in self._lay[1]:
            text[q] = 32
        return bytes(text)

    def part(self, flags: frozenset[str]) -> tuple[bytes, bool]:
        """The text ``h``/``b`` select, and whether it starts at the From_ line."""
        h, b = "h" in flags, "b" in flags
        body = self.body_offset()
        if h and not b:
            return self.mail[:body], True
        if b and not h:
            return self.mail[body:], False
        return self.mail, True

    def path(self, name: str) -> Path:
        return Path(name) if os.path.isabs(name) else Path(self.cwd, name)

    def env(self) -> dict[str, str]:
        return {**self.vars, "PWD": self.cwd}

    def set_lastfolder(self, name: str) -> None:
        self.vars["LASTFOLDER"] = name

    @property
    def rcfile_name(self) -> str:
        """The name of the rcfile being run (``$_``)."""
        return next((f.name for f in reversed(self.frames) if f.kind == "file"), "")

    def abstract(self, force: bool = False) -> None:
        """procmail's log abstract (From_ line, Subject, Folder and size) in LOGFILE."""
        if self.logfile is None or not (self.delivered or force):
            return
        setting = self.vars.get("LOGABSTRACT", "yes").strip().lower()
        if setting.startswith(("n", "f", "d", "0", "off")):
            return
        body = self.body_offset()
        lines = []
        if self.mail.startswith(b"From "):
            lines.append(self.mail.split(b"\n", 1)[0].decode("utf-8", "surrogateescape"))
        m = re.search(rb"^Subject:.*", self.mail[:body], re.MULTILINE | re.IGNORECASE)
        if m:
            lines.append(" " + m.group().decode("utf-8", "surrogateescape")[:78].replace("\t", " "))
        folder = self.vars.get("LASTFOLDER", "")
        col = len("  Folder: " + folder)
        col -= col % 8
        tabs = "\t"
        while (col := col + 8) < 72:
            tabs += "\t"
        lines.append(f"  Folder: {folder}{tabs}{len(self.mail):>7}")
        self.logwrite("".join(line + "\n" for line in lines))

    # ------------------------------------------------------------ expansion and programs

    def expand_words(self, raw: str) -> list[str]:
        return expand.words(self, raw)

    def expand_one(self, raw: str) -> str:
        return expand.value(self, raw)

    def expand_cond(self, raw: str, dq: bool = True) -> str:
        return expand.condition(self, raw, dq)

    def lookup(self, name: str) -> str | None:
        if name[:1].isdigit():
            return None
        return self.vars.get(name)

    def argv(self, raw: str, what: str) -> list[str] | None:
        """A command line as words, or None (logged) if it needs a shell."""
        metas = expand.unquoted_shell_chars(raw)
        if metas:
            self.error(f"{what} refused, it needs a shell ({' '.join(sorted(metas))}): {raw.strip()}")
            return None
        words = self.expand_words(raw)
        home = self.vars.get("HOME", "")
        words = [home + w[1:] if w == "~" or w.startswith("~/") else w for w in words]
        if not words:
            self.error(f"{what}: the command expands to nothing")
        return words or None

    def run_test(self, raw: str, data: bytes) -> int | None:
        """A ``?`` condition's exit code, or None if the program was not run."""
        what = "? condition"
        if not self.allow_pipes:
            self.error(f"{what} not run (programs are disabled): {raw.strip()}")
            return None
        argv = self.argv(raw, what)
        if not argv:
            return None
        try:
            code, _ = self.executor.pipe(argv, terminate(data), self.env(), False)
        except Exception as exc:  # noqa: BLE001
            self.error(f"{what} {argv[0]} failed: {type(exc).__name__}: {exc}")
            return None
        self.lastexit = code
        return code

    def backquote(self, command: str) -> str:
        what = "backquote"
        if not self.allow_pipes:
            self.error(f"{what} not run (programs are disabled): `{command.strip()}`")
            return ""
        argv = self.argv(command, what)
        if not argv:
            return ""
        try:
            code, out = self.executor.pipe(argv, terminate(self.mail), self.env(), True)
        except Exception as exc:  # noqa: BLE001
            self.error(f"{what} {argv[0]} failed: {type(exc).__name__}: {exc}")
            return ""
        self.lastexit = code
        return out.decode("utf-8", "surrogateescape").rstrip("\n")
