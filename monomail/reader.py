"""``monomail mail``: read a local mailbox the way binmail and mailx do.

Job: list, show, delete, save and answer the messages of one mailbox, an mbox file or
a Maildir folder, and write the reader's decisions back without ever losing mail that
the server delivers meanwhile. Not here: delivering (``mailstore``), submitting a new
message (``monomail sendmail``, reached through the ``submit`` hook), MIME rendering
beyond undoing a text part's base64 or quoted-printable.

Usage::

    monomail mail [-c CONFIG] [-u USER | -f MAILBOX] [-H | -p]

``-f MAILBOX`` reads a path: a directory holding ``cur/``, ``new/`` and ``tmp/`` is a
Maildir (https://cr.yp.to/proto/maildir.html), anything else an mbox file (mboxrd).
``-u USER`` reads the mailbox that ``[users.USER]`` of the config names; with neither,
the login name's. ``-H`` prints the header summary and exits, ``-p`` prints every
message and exits; both only read (nothing is marked or deleted; only an interrupted
rewrite found on opening is finished, as below). Exit status: 0 done, 1 a runtime
failure (mailbox locked or changed under us, I/O error), 2 bad usage or configuration.

Otherwise the summary is followed by a command loop, whether or not stdin is a
terminal: ``echo 'd 1' | monomail mail -f box`` works as in mailx. The ``? `` prompt
is shown only when stdin is a terminal. End of input at the prompt is ``q``.

Commands (MSGS is one or more of ``N``, ``N-M``, ``.`` (current), ``$`` (last),
``*`` (all); it defaults to the current message)::

    p [MSGS]       print                  d [MSGS]     delete (until q)
    n, +, Enter    next message           u [MSGS]     undelete (alone: the last deleted)
    -              previous message       s [MSGS] FILE  append to an mbox FILE (or Maildir)
    N              select and print N     r [N]        reply to the sender
    h              the summary again      m ADDR...    write a new message
    q              quit, applying deletions and read marks
    x              quit, changing nothing ?            help

A message body is typed after ``r`` or ``m`` and ends at a line holding only ``.``,
or at end of input. It is handed to ``submit(sender, recipients, message_bytes)``; the
default runs ``python -m monomail sendmail -i -- ADDR...`` with the message on stdin.
If that fails the message is appended to ``$DEAD`` or ``~/dead.letter``.

Read state. Summary markers: ``N`` new, ``U`` seen in a listing before but not read,
blank: read, ``D`` deleted in this session, ``>`` the current message.
Maildir: ``new/`` is new; ``S`` in the info (``name:2,FLAGS``) is read. On ``q`` a
message read in this session moves to ``cur/`` as ``name:2,FLAGS`` with ``S`` added
(flags kept, ASCII order); a deleted one is unlinked; messages not touched stay where
they are. A file renamed meanwhile by another client (a flag change) is found again by
its unique part; one that vanished is reported and skipped.
mbox: a message without ``Status:`` (or without ``O``/``R`` in it) is new, ``R`` is
read; a message read in this session gets ``Status: RO`` (other letters kept).

Writing an mbox back, and why it is safe
----------------------------------------

The rewrite runs under the very locks monomail's delivery takes, checks that the bytes
loaded when the session began are still the file's prefix (else it stops and changes
nothing), keeps the mail that arrived meanwhile, and is journalled so that a crash at
any instant loses nothing: see ``mboxrewrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.message import Message as EmailHeaders
from email.parser import BytesHeaderParser, BytesParser
from email.utils import formatdate, getaddresses, make_msgid, parsedate_to_datetime
from pathlib import Path
from typing import TextIO

from . import mailstore
from .errors import ConfigError
from .mboxrewrite import (
    DEFAULT_LOCK_TIMEOUT,
    RewriteError,
    _fsync_dir,
    _join,
    _journaled_rewrite,
    _no_append,
    _no_interrupts,
    _pread_all,
    _replay,
    journal_path,
)

Submit = Callable[[str, Sequence[str], bytes], None]
"""``submit(envelope_sender, recipients, message)``: hand one message on, or raise."""

SUBMIT_TIMEOUT = 120.0
_MBOX_FROM = re.compile(rb"^From ", re.MULTILINE)
_UNQUOTE = re.compile(rb"^>(>*From )", re.MULTILINE)
_STATUS = re.compile(rb"^Status:[ \t]*([^\n]*)\n", re.MULTILINE | re.IGNORECASE)
_MAILDIR_TIME = re.compile(r"(\d+)(?:\.M(\d+))?")
_MSG_ID = re.compile(r"<[^<>\s]+>")
_CONTROL = {c: "?" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}

# Fault-injection seam for the crash tests: called with each step name of a rewrite.
ReaderError = RewriteError  # something the user is told in one line (no traceback)


class MailboxChanged(ReaderError):
    """The mbox no longer starts with what this session loaded: nothing was written."""


# --------------------------------------------------------------------------- messages


@dataclass(eq=False, slots=True)
class Message:
    raw: bytes  # the message as delivered (mboxrd quoting undone), LF line ends
    envelope_sender: str
    received: float
    flags: str  # Maildir info flags, or the letters of an mbox Status: field
    new: bool
    seen: bool
    deleted: bool = False
    read_now: bool = False  # shown in this session
    # mbox: where it is in the loaded bytes
    start: int = 0
    end: int = 0
    from_line: bytes = b""
    quoted: bytes = b""
    sep: bytes = b""
    # Maildir: its file
    subdir: str = ""
    name: str = ""
    _headers: EmailHeaders | None = field(default=None, repr=False)

    @property
    def headers(self) -> EmailHeaders:
        if self._headers is None:
            self._headers = BytesHeaderParser(policy=policy.compat32).parsebytes(self.raw)
        return self._headers

    def header(self, name: str) -> str:
        """A header field decoded (RFC 2047), unfolded, without control characters."""
        value = self.headers.get(name)
        if value is None:
            return ""
        try:
            text = str(make_header(decode_header(str(value))))
        except Exception:  # noqa: BLE001 - a malformed encoded-word shows as it is
            text = str(value)
        return " ".join(text.split()).translate(_CONTROL)

    @property
    def marker(self) -> str:
        if self.deleted:
            return "D"
        if self.seen or self.read_now:
            return " "
        return "N" if self.new else "U"


def _sender_display(m: Message) -> str:
    pairs = getaddresses([m.header("From")])
    name, addr = pairs[0] if pairs else ("", "")
    return name or addr or m.envelope_sender or "(unknown)"


def _date_display(m: Message) -> str:
    when = None
    date = m.header("Date")
    if date:
        with contextlib.suppress(Exception):
            when = parsedate_to_datetime(date).astimezone()
    if when is None:
        from datetime import datetime

        when = datetime.fromtimestamp(m.received)
    return f"{when:%a %b} {when.day:2d} {when:%H:%M}"


def summary_line(number: int, m: Message, current: bool) -> str:
    lines = m.raw.count(b"\n")
    subject = m.header("Subject")
    return (f"{'>' if current else ' '}{m.marker} {number:3d} {_sender_display(m)[:24]:<24} "
            f"{_date_display(m)}  {f'{lines}/{len(m.raw)}':>9}  {subject}")


def render(m: Message) -> str:
    """Headers as they are; the body, decoded if it is one text part in base64 or QP."""
    head, _, body = m.raw.partition(b"\n\n")
    text = body.decode("utf-8", "replace")
    with contextlib.suppress(Exception):
        parsed = BytesParser(policy=policy.default).parsebytes(m.raw)
        if (not parsed.is_multipart() and parsed.get_content_maintype() == "text"
                and parsed.get("Content-Transfer-Encoding", "").strip().lower() in ("base64", "quoted-printable")):
            text = parsed.get_content()
    out = head.decode("utf-8", "replace") + "\n\n" + text
    return out.translate(_CONTROL) + ("" if out.endswith("\n") else "\n")


# --------------------------------------------------------------------------- mbox


def _parse_from_line(line: bytes) -> tuple[str, float | None]:
    rest = line[5:].decode("utf-8", "replace").strip()
    sender, _, date = rest.partition(" ")
    try:
        when: float | None = time.mktime(time.strptime(" ".join(date.split()[:5]), "%a %b %d %H:%M:%S %Y"))
    except (ValueError, OverflowError):
        when = None
    return ("" if sender == "MAILER-DAEMON" else sender), when


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def _date_of(raw: bytes) -> float | None:
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
    with contextlib.suppress(Exception):
        return parsedate_to_datetime(str(headers.get("Date", ""))).timestamp()
    return None


def _header_end(quoted: bytes) -> int:
    """Offset just past the last header line (where a new field would go)."""
    if quoted.startswith(b"\n"):
        return 0
    i = quoted.find(b"\n\n")
    return len(quoted) if i < 0 else i + 1


def _with_status(quoted: bytes, add: str) -> bytes:
    head_end = _header_end(quoted)
    m = _STATUS.search(quoted, 0, head_end)
    if m is None:
        return quoted[:head_end] + b"Status: " + add.encode() + b"\n" + quoted[head_end:]
    old = m.group(1).decode("ascii", "replace").strip()
    letters = add + "".join(c for c in old if c not in add)
    return quoted[: m.start()] + b"Status: " + letters.encode() + b"\n" + quoted[m.end():]


def parse_mbox(data: bytes) -> list[Message]:
    starts = [m.start() for m in _MBOX_FROM.finditer(data)]
    messages = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        region = data[start:end]
        nl = region.find(b"\n")
        from_line = region if nl < 0 else region[: nl + 1]
        body = region[len(from_line):]
        quoted = body[:-1] if body.endswith(b"\n\n") else body
        m = _STATUS.search(quoted, 0, _header_end(quoted))
        flags = m.group(1).decode("ascii", "replace").strip() if m else ""
        raw = _UNQUOTE.sub(rb"\1", quoted)
        sender, when = _parse_from_line(from_line)
        messages.append(Message(
            raw=raw, envelope_sender=sender, received=_first(when, _date_of(raw), time.time()), flags=flags,
            new="O" not in flags and "R" not in flags, seen="R" in flags,
            start=start, end=end, from_line=from_line, quoted=quoted, sep=body[len(quoted):],
        ))
    return messages


class MboxFolder:
    kind = "mbox"

    def __init__(self, path: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self.data = b""
        self.recovered = False

    def load(self) -> list[Message]:
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise ReaderError(f"{self.path}: neither a file nor a Maildir folder (cur/, new/, tmp/)")
        with _no_interrupts(), mailstore.locked_mbox(self.path, self.lock_timeout) as fd:
            _no_append(fd)
            if journal_path(self.path).exists():
                _replay(fd, self.path)
                self.recovered = True
            self.data = _pread_all(fd, os.fstat(fd).st_size, 0)
        return parse_mbox(self.data)

    def commit(self, messages: Sequence[Message]) -> str:
        deleted = [m for m in messages if m.deleted]
        marked = [m for m in messages if not m.deleted and m.read_now and "R" not in m.flags]
        kept = len(messages) - len(deleted)
        if not deleted and not marked:
            return _held(self.path, kept, 0, 0)
        with _no_interrupts(), mailstore.locked_mbox(self.path, self.lock_timeout) as fd:
            _no_append(fd)
            size = os.fstat(fd).st_size
            loaded = len(self.data)
            if size < loaded or _pread_all(fd, loaded, 0) != self.data:
                raise MailboxChanged(f"{self.path} was changed by another program while you read it; "
                                     "nothing was written (deletions and read marks not applied)")
            if journal_path(self.path).exists():
                raise MailboxChanged(f"{self.path}: another reader's rewrite was interrupted; nothing was "
                                     "written (run monomail mail again to finish it)")
            first = min(m.start for m in (*deleted, *marked))
            mark = {id(m) for m in marked}
            pieces = []
            for m in messages:
                if m.start < first or m.deleted:
                    continue
                if id(m) in mark:
                    pieces.append(m.from_line + _with_status(m.quoted, "RO") + m.sep)
                else:
                    pieces.append(self.data[m.start:m.end])
            tail = _pread_all(fd, size - loaded, loaded)
            arrived = len(_MBOX_FROM.findall(tail))
            region = _join(self.data[max(0, first - 2):first], b"".join(pieces), tail)
            _journaled_rewrite(fd, self.path, first, region, size)
        return _held(self.path, kept + arrived, len(deleted), arrived)


def _held(path: Path, held: int, deleted: int, arrived: int) -> str:
    text = f"Held {held} message{'s' * (held != 1)} in {path}"
    if deleted:
        text += f", deleted {deleted}"
    if arrived:
        text += f" ({arrived} arrived while you read)"
    return text


# --------------------------------------------------------------------------- Maildir


def _maildir_key(name: str, path: Path) -> tuple[int, int, str]:
    m = _MAILDIR_TIME.match(name)
    if m:
        return int(m.group(1)), int(m.group(2) or 0), name
    try:
        return int(path.stat().st_mtime), 0, name
    except OSError:
        return 0, 0, name


class MaildirFolder:
    kind = "maildir"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []

    def load(self) -> list[Message]:
        if not self.path.exists():
            return []
        found: list[tuple[tuple[int, int, str], Message]] = []
        for sub in ("new", "cur"):
            for name in os.listdir(self.path / sub):
                if name.startswith("."):
                    continue
                file = self.path / sub / name
                try:
                    raw = file.read_bytes()
                except (FileNotFoundError, IsADirectoryError):
                    continue  # moved by another client this instant, or not a message
                info = name.partition(":")[2]
                flags = info[2:] if info.startswith("2,") else ""
                sender = ""
                rp = BytesHeaderParser(policy=policy.compat32).parsebytes(raw).get("Return-Path")
                if rp is not None:
                    sender = str(rp).strip().strip("<>").strip()
                key = _maildir_key(name, file)
                found.append((key, Message(raw=raw, envelope_sender=sender, received=float(key[0]) or time.time(),
                                           flags=flags, new=sub == "new", seen="S" in flags,
                                           subdir=sub, name=name)))
        found.sort(key=lambda pair: pair[0])
        return [m for _, m in found]

    def _locate(self, m: Message) -> Path | None:
        path = self.path / m.subdir / m.name
        if path.exists():
            return path
        unique = m.name.partition(":")[0]
        for sub in ("cur", "new"):
            with contextlib.suppress(OSError):
                for name in os.listdir(self.path / sub):
                    if name.partition(":")[0] == unique:
                        return self.path / sub / name
        return None

    def commit(self, messages: Sequence[Message]) -> str:
        with _no_interrupts():
            return self._commit(messages)

    def _commit(self, messages: Sequence[Message]) -> str:
        deleted = 0
        for number, m in enumerate(messages, 1):
            if not m.deleted and not (m.read_now and "S" not in m.flags):
                continue
            for _attempt in range(3):  # another client may rename it between look and act
                path = self._locate(m)
                if path is None:
                    self.warnings.append(f"message {number} was removed by another program; left as it is")
                    break
                try:
                    if m.deleted:
                        path.unlink()
                        deleted += 1
                    else:
                        unique, _, info = path.name.partition(":")
                        flags = info[2:] if info.startswith("2,") else ""
                        os.rename(path, self.path / "cur" / f"{unique}:2,{''.join(sorted(set(flags + 'S')))}")
                    break
                except FileNotFoundError:
                    continue
        for sub in ("new", "cur"):
            with contextlib.suppress(OSError):
                _fsync_dir(self.path / sub)
        known = {m.name.partition(":")[0] for m in messages}
        arrived = 0
        for sub in ("new", "cur"):
            with contextlib.suppress(OSError):
                arrived += sum(1 for n in os.listdir(self.path / sub)
                               if not n.startswith(".") and n.partition(":")[0] not in known)
        return _held(self.path, len(messages) - deleted + arrived, deleted, arrived)


def open_folder(path: Path, fmt: str | None = None,
                lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> MboxFolder | MaildirFolder:
    """``fmt`` ``"maildir"``/``"mbox"``, or None: a folder with cur/, new/, tmp/ is a Maildir."""
    if fmt is None:
        fmt = "maildir" if path.is_dir() and all((path / s).is_dir() for s in ("cur", "new", "tmp")) else "mbox"
    return MaildirFolder(path) if fmt == "maildir" else MboxFolder(path, lock_timeout)


# --------------------------------------------------------------------------- composing


def sendmail_submit(sender: str, recipients: Sequence[str], message: bytes, *, config: Path | None = None) -> None:
    """The default ``submit``: ``python -m monomail sendmail -i -- RCPT...``, message on
    stdin; ``config`` (the reader's own) is passed as ``$MONOMAIL_CONFIG``. The envelope
    sender is left to sendmail (the login name), as mailx does."""
    cmd = [sys.executable, "-m", "monomail", "sendmail", "-i", "--", *recipients]
    env = None if config is None else {**os.environ, "MONOMAIL_CONFIG": str(config)}
    try:
        proc = subprocess.run(cmd, input=message, capture_output=True, timeout=SUBMIT_TIMEOUT, check=False,
                              env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReaderError(f"monomail sendmail: {exc}") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ReaderError(f"monomail sendmail exited {proc.returncode}" + (f": {detail[-1]}" if detail else ""))


def compose(from_addr: str, to: Sequence[str], subject: str, body: str, *,
            in_reply_to: str = "", references: Sequence[str] = (), domain: str | None = None) -> bytes:
    msg = EmailMessage()
    if from_addr:
        msg["From"] = from_addr
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=domain)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = " ".join([*references, in_reply_to][-20:])
    msg.set_content(body)
    return msg.as_bytes()


def reply_addresses(m: Message) -> list[str]:
    for name in ("Reply-To", "From"):
        addrs = [a for _, a in getaddresses([m.header(name)]) if a]
        if addrs:
            return addrs
    return [m.envelope_sender] if m.envelope_sender else []


def _dead_letter(message: bytes, sender: str) -> Path:
    path = Path(os.environ.get("DEAD") or Path.home() / "dead.letter")
    mailstore.deliver_mbox(path, [(sender, time.time(), [mailstore.mbox_quote(message)])], DEFAULT_LOCK_TIMEOUT)
    return path


# --------------------------------------------------------------------------- the session

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


class Session:
    def __init__(self, folder: MboxFolder | MaildirFolder, messages: list[Message], *, out: TextIO, inp: TextIO,
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
        self.tty = _isatty(inp)
        self.cur = next((i for i, m in enumerate(messages) if m.new),
                        next((i for i, m in enumerate(messages) if not m.seen), 0))
        self.shown = False  # the current message has been printed
        self.undo: list[int] = []

    # ---- I/O
    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def readline(self, prompt: str = "") -> str | None:
        if prompt and self.tty:
            self.out.write(prompt)
            self.out.flush()
        line = self.inp.readline()
        if not line:
            if self.tty:
                self.out.write("\n")
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
            except _Bad as exc:
                self.say(str(exc))
                continue
            except KeyboardInterrupt:
                self.say("\n(Interrupt)")
                continue
            except (OSError, mailstore.MailboxLocked, ReaderError) as exc:
                self.say(f"error: {_describe(exc)}")
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
            self.out.write(HELP)
            self.out.flush()
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
        self.out.write(f"Message {i + 1}:\n{render(m)}")
        self.out.flush()

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
                where = f"; saved in {_dead_letter(data, self.sender)}"
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else _describe(exc)
            self.say(f"not sent: {reason}{where}")
            return
        self.say(f"Sent to {', '.join(to)}.")

    def quit(self) -> int | None:
        try:
            text = self.folder.commit(self.messages)
        except mailstore.MailboxLocked as exc:
            self.say(f"error: {exc}; q tries again, x quits without changes")
            return None
        except MailboxChanged as exc:
            self.say(f"error: {exc}")
            return 1
        for warning in getattr(self.folder, "warnings", ()):
            self.say(f"warning: {warning}")
        self.say(text)
        return 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monomail mail",
        description="Read a local mailbox (mbox file or Maildir folder), like binmail/mailx.",
        epilog="Commands at the prompt: ? lists them.",
    )
    parser.add_argument("-c", "--config", help="configuration file (default: ./monomail.toml)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("-u", "--user", help="read this configured user's mailbox (default: the login name)")
    who.add_argument("-f", "--file", metavar="MAILBOX", help="read this mbox file or Maildir folder")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-H", "--headers", action="store_true", help="print the message summary and exit")
    mode.add_argument("-p", "--print", dest="print_all", action="store_true", help="print every message and exit")
    return parser


def main(argv: Sequence[str], config_path: str | None = None, *, submit: Submit | None = None,
         stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """``monomail mail``; ``argv`` are the arguments after ``mail``. ``config_path`` is the
    config used when argv has no ``-c`` (default ``monomail.toml``). Exit status: 0 ok,
    1 runtime failure (locked, changed under us, I/O), 2 bad usage or configuration."""
    out = stdout or sys.stdout
    inp = stdin or sys.stdin
    for stream in {out, inp} & {sys.stdout, sys.stdin}:  # a terminal's encoding must not end the session
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _run(args, config_path, submit, inp, out)
    except ConfigError as exc:
        print(f"monomail: config error: {exc}", file=sys.stderr)
        return 2
    except (ReaderError, mailstore.MailboxLocked, OSError) as exc:
        print(f"monomail mail: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"monomail mail: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, config_path: str | None, submit: Submit | None, inp: TextIO, out: TextIO) -> int:
    from .config import load

    cfg_file = args.config or config_path or "monomail.toml"
    config = None
    if args.file is None or args.config or Path(cfg_file).is_file():
        config = load(Path(cfg_file))
    login = getpass.getuser()
    fmt: str | None = None
    user_name = None
    if args.file is not None:
        path = Path(args.file).expanduser().absolute()
        if config is not None and login.lower() in config.users:
            user_name = login.lower()
    else:
        assert config is not None
        name = (args.user or login).lower()
        if name not in config.users:
            print(f"monomail mail: no user {name!r} in {config.path}"
                  + ("" if args.user else "; use -u USER or -f MAILBOX"), file=sys.stderr)
            return 2
        user_name = name
        path, fmt = config.users[name].path, config.users[name].mailbox_format
    lock_timeout = config.local.lock_timeout if config is not None else DEFAULT_LOCK_TIMEOUT
    folder = open_folder(path, fmt, lock_timeout)
    messages = folder.load()
    if isinstance(folder, MboxFolder) and folder.recovered:
        print(f"monomail mail: finished an interrupted rewrite of {path}", file=sys.stderr)
    if not messages:
        out.write(f"No mail in {path}\n")
        return 0
    if args.print_all:
        for i, m in enumerate(messages):
            out.write(f"Message {i + 1}:\n{render(m)}\n")
        return 0
    domain = config.local.primary_domain if config is not None else None
    from_addr = f"{user_name}@{domain}" if user_name and domain else ""
    if submit is None:
        submit = functools.partial(sendmail_submit, config=config.path if config is not None else None)
    session = Session(folder, messages, out=out, inp=inp, submit=submit, sender=from_addr or login,
                      from_addr=from_addr, domain=domain, lock_timeout=lock_timeout)
    if args.headers:
        session.headers()
        return 0
    return session.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
