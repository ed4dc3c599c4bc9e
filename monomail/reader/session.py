"""The interactive session of ``monomail mail``: the ``?`` prompt and its commands.

Job: read command lines (from a terminal or a pipe: ``echo 'd 1' | monomail mail``
works as in mailx), keep the session's state (current message, deletions, read marks)
and carry out each command, answering every mistake in one line. The ``? `` prompt is
shown only when input is a terminal; end of input at the prompt is ``q``. Commands are
listed in `HELP`; MSGS is one or more of ``N``, ``N-M``, ``.``, ``$``, ``*``.

Error handling: a command that fails (bad number, locked mailbox, I/O error, even a
bug) is reported and the session goes on. Output that can no longer be written (the
reader of a pipe went away: ``monomail mail | head``) ends the session at once with
`OutputClosed`, changing nothing, as mailx does when SIGPIPE ends it.
Not here: the folders (``folders``), building and sending mail (``compose``), the
command line (the package's ``main``).
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .. import mailstore
from ..errors import MailboxChanged, MailboxLocked, ReaderError
from .compose import Submit, compose, dead_letter, reply_addresses
from .folders import Folder
from .messages import Message, render, summary_line

_MSG_ID = re.compile(r"<[^<>\s]+>")

HELP = """\
p [MSGS]        print messages (default: the current one)
n, +, Enter     print the next message          -          print the previous one
N               print message N                 h          the message summary again
d [MSGS]        delete (applied on q)           u [MSGS]   undelete (alone: the last deleted)
s [MSGS] FILE   append to an mbox FILE          r [N]      reply to the sender
m ADDR...       write a new message             ?          this help
q               quit: apply deletions, mark read messages
x               quit without changing the mailbox
MSGS: N, N-M, . (current), $ (last), * (all)
"""


class _Bad(Exception):
    """A command the user got wrong; the text says how."""


class OutputClosed(Exception):
    """The output can no longer be written (EPIPE: the reader of a pipe went away)."""


def write(out: TextIO, text: str) -> None:
    """Write and flush ``text``; a closed pipe becomes `OutputClosed`."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError as exc:
        raise OutputClosed(str(exc)) from exc


class Session:
    """One reading session over the loaded ``messages`` of ``folder``; `run` is the loop,
    `command` one line of it, `quit` the commit. Output goes through `write`."""

    def __init__(self, folder: Folder, messages: list[Message], *, out: TextIO, inp: TextIO,
                 submit: Submit, sender: str, from_addr: str, domain: str | None, lock_timeout: float) -> None:
        self.folder = folder
        self.messages = messages
        self.out = out
        self.inp = inp
        self.submit = submit
        self.sender = sender
        self.from_addr = from_addr
        self.domain = domain
        self.lock_timeout = lock_timeout
        self.tty = isatty(inp)
        self.cur = next((i for i, m in enumerate(messages) if m.new),
                        next((i for i, m in enumerate(messages) if not m.seen), 0))
        self.shown = False  # the current message has been printed
        self.undo: list[int] = []

    # ---- I/O
    def say(self, text: str = "") -> None:
        write(self.out, text + "\n")

    def readline(self, prompt: str = "") -> str | None:
        if prompt and self.tty:
            write(self.out, prompt)
        line = self.inp.readline()
        if not line:
            if self.tty:
                write(self.out, "\n")
            return None
        return line.rstrip("\r\n")

    # ---- the loop
    def run(self) -> int:
        self.headers()
        while True:
            try:
                line = self.readline("? ")
            except KeyboardInterrupt:
                self.say("\n(Interrupt: q quits applying changes, x quits without)")
                continue
            if line is None:  # end of input: q (once: a pipe stays at its end)
                done = self.quit()
                return 1 if done is None else done
            try:
                done = self.command(line)
            except OutputClosed:
                raise  # nobody is listening: stop, changing nothing
            except _Bad as exc:
                self.say(str(exc))
                continue
            except KeyboardInterrupt:
                self.say("\n(Interrupt)")
                continue
            except (OSError, MailboxLocked, ReaderError) as exc:
                self.say(f"error: {describe(exc)}")
                continue
            except Exception as exc:  # noqa: BLE001 - a bug must not end the session with a traceback
                self.say(f"error: {type(exc).__name__}: {exc}")
                continue
            if done is not None:
                return done

    def command(self, line: str) -> int | None:
        text = line.strip()
        if text == "-":
            self.previous()
            return None
        if text in ("", "+"):
            self.next()
            return None
        if text.isdigit():
            self.print_message(self.pick([text])[0])
            return None
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise _Bad(f"cannot parse that line: {exc}") from None
        name, args = words[0], words[1:]
        if name in ("p", "print", "t", "type"):
            for n in self.pick(args):
                self.print_message(n)
        elif name in ("n", "next"):
            self.next()
        elif name in ("d", "delete"):
            self.delete(self.pick(args))
        elif name in ("u", "undelete"):
            self.undelete(args)
        elif name in ("s", "save"):
            if not args:
                raise _Bad("usage: s [MSGS] FILE")
            self.save(self.pick(args[:-1]), args[-1])
        elif name in ("r", "reply", "R", "respond"):
            nums = self.pick(args)
            if len(nums) != 1:
                raise _Bad("reply to one message at a time: r [N]")
            self.reply(nums[0])
        elif name in ("m", "mail"):
            if not args:
                raise _Bad("usage: m ADDR...")
            self.mail(args)
        elif name in ("h", "headers", "f", "from"):
            self.headers()
        elif name in ("q", "quit"):
            return self.quit()
        elif name in ("x", "ex", "exit", "xit"):
            return 0
        elif name in ("?", "help"):
            write(self.out, HELP)
        else:
            raise _Bad(f"Unknown command: {name!r} (? for help)")
        return None

    # ---- message numbers
    def pick(self, tokens: Sequence[str], *, deleted_ok: bool = False) -> list[int]:
        """0-based indexes for MSGS tokens (default: the current message)."""
        count = len(self.messages)
        if not tokens:
            if not count:
                raise _Bad("No messages.")
            tokens = ["."]
        picked: list[int] = []
        for token in tokens:
            if token == "*":
                picked.extend(i for i, m in enumerate(self.messages) if deleted_ok or not m.deleted)
                continue
            if token == ".":
                nums = [self.cur + 1]
            elif token == "$":
                nums = [count]
            elif re.fullmatch(r"\d+-\d+", token):
                a, b = (int(x) for x in token.split("-"))
                if a > b:
                    raise _Bad(f"bad range {token}: {a} is after {b}")
                nums = list(range(a, b + 1))
            elif token.isdigit():
                nums = [int(token)]
            else:
                raise _Bad(f"not a message number: {token!r} (? for help)")
            for n in nums:
                if not 1 <= n <= count:
                    raise _Bad(f"No message {n}: messages are 1 to {count}." if count else "No messages.")
                if self.messages[n - 1].deleted and not deleted_ok:
                    raise _Bad(f"Message {n} is deleted (u {n} undeletes it).")
                picked.append(n - 1)
        if not picked:
            raise _Bad("No applicable messages.")
        return picked

    # ---- commands
    def headers(self) -> None:
        ms = self.messages
        new = sum(1 for m in ms if not m.deleted and m.marker == "N")
        unread = sum(1 for m in ms if not m.deleted and m.marker == "U")
        deleted = sum(1 for m in ms if m.deleted)
        parts = [f"{len(ms)} message{'s' * (len(ms) != 1)}"]
        parts += [f"{n} {what}" for n, what in ((new, "new"), (unread, "unread"), (deleted, "deleted")) if n]
        self.say(f'"{self.folder.path}": ' + " ".join(parts))
        for i, m in enumerate(ms):
            self.say(summary_line(i + 1, m, i == self.cur))

    def print_message(self, i: int) -> None:
        m = self.messages[i]
        self.cur, self.shown = i, True
        m.read_now = True
        write(self.out, f"Message {i + 1}:\n{render(m)}")

    def next(self) -> None:
        if not self.messages:
            raise _Bad("No messages.")
        if not self.shown and not self.messages[self.cur].deleted:
            self.print_message(self.cur)
            return
        i = next((j for j in range(self.cur + 1, len(self.messages)) if not self.messages[j].deleted), None)
        if i is None:
            raise _Bad("At EOF")
        self.print_message(i)

    def previous(self) -> None:
        i = next((j for j in range(self.cur - 1, -1, -1) if not self.messages[j].deleted), None)
        if i is None:
            raise _Bad("No previous message")
        self.print_message(i)

    def delete(self, nums: Sequence[int]) -> None:
        for i in nums:
            self.messages[i].deleted = True
            self.undo.append(i)
        if self.messages[self.cur].deleted:
            after = [j for j in range(self.cur + 1, len(self.messages)) if not self.messages[j].deleted]
            before = [j for j in range(self.cur - 1, -1, -1) if not self.messages[j].deleted]
            if after or before:
                self.cur = (after or before)[0]
                self.shown = False

    def undelete(self, tokens: Sequence[str]) -> None:
        if tokens:
            nums = self.pick(tokens, deleted_ok=True)
        else:
            while self.undo and not self.messages[self.undo[-1]].deleted:
                self.undo.pop()
            if not self.undo:
                raise _Bad("No deleted message to undelete.")
            nums = [self.undo.pop()]
        for i in nums:
            self.messages[i].deleted = False
        self.cur, self.shown = nums[-1], False

    def save(self, nums: Sequence[int], target: str) -> None:
        path = Path(target).expanduser()
        if path.is_dir():
            if not all((path / s).is_dir() for s in ("cur", "new", "tmp")):
                raise _Bad(f"{path}: a folder but not a Maildir; give a file name")
        elif not path.parent.is_dir():
            raise _Bad(f"{path.parent}: no such folder")
        size = 0
        for i in nums:
            m = self.messages[i]
            if path.is_dir():
                mailstore.deliver_maildir(path, [m.raw])
            else:
                mailstore.deliver_mbox(path, [(m.envelope_sender, m.received, [mailstore.mbox_quote(m.raw)])],
                                       self.lock_timeout)
            size += len(m.raw)
        self.say(f'"{path}": appended {len(nums)} message{"s" * (len(nums) != 1)}, {size} bytes')

    def read_body(self) -> str | None:
        self.say("(end with a line holding only '.', or end of input)")
        lines: list[str] = []
        try:
            while True:
                line = self.readline()
                if line is None or line == ".":
                    break
                lines.append(line)
        except KeyboardInterrupt:
            self.say("\n(Interrupt -- message not sent)")
            return None
        return "\n".join(lines) + "\n" if lines else "\n"

    def reply(self, i: int) -> None:
        m = self.messages[i]
        to = reply_addresses(m)
        if not to:
            raise _Bad(f"Message {i + 1} has no address to reply to.")
        subject = m.header("Subject")
        if not subject.lower().startswith("re:"):
            subject = f"Re: {subject}".rstrip()
        ids = _MSG_ID.findall(m.header("Message-ID"))
        refs = _MSG_ID.findall(m.header("References")) or _MSG_ID.findall(m.header("In-Reply-To"))[:1]
        self.say(f"To: {', '.join(to)}\nSubject: {subject}")
        body = self.read_body()
        if body is None:
            return
        data = compose(self.from_addr, to, subject, body, in_reply_to=ids[0] if ids else "",
                       references=refs, domain=self.domain)
        self.send(to, data)

    def mail(self, to: Sequence[str]) -> None:
        for addr in to:
            if not re.fullmatch(r"[^\s<>(),;:\"\\]+(@[^\s<>(),;:\"\\@]+)?", addr):
                raise _Bad(f"not an address: {addr!r}")
        try:
            subject = self.readline("Subject: ")
        except KeyboardInterrupt:
            self.say("\n(Interrupt -- message not sent)")
            return
        body = self.read_body()
        if body is None:
            return
        self.send(to, compose(self.from_addr, to, " ".join((subject or "").split()), body, domain=self.domain))

    def send(self, to: Sequence[str], data: bytes) -> None:
        try:
            self.submit(self.sender, list(to), data)
        except (Exception, KeyboardInterrupt) as exc:  # whatever the hook raised: keep the text
            where = ""
            with contextlib.suppress(Exception):
                where = f"; saved in {dead_letter(data, self.sender)}"
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else describe(exc)
            self.say(f"not sent: {reason}{where}")
            return
        self.say(f"Sent to {', '.join(to)}.")

    def quit(self) -> int | None:
        try:
            text = self.folder.commit(self.messages)
        except MailboxLocked as exc:
            self.say(f"error: {exc}; q tries again, x quits without changes")
            return None
        except MailboxChanged as exc:
            self.say(f"error: {exc}")
            return 1
        for warning in self.folder.warnings:
            self.say(f"warning: {warning}")
        self.say(text)
        return 0


def isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def describe(exc: BaseException) -> str:
    """An exception in one line for the user: ``PATH: reason``, or its text."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__
