"""Procmail-compatible recipe files: parse a user's ``.procmailrc`` and run it on one message.

Job: the decisions procmail(1) makes for one local delivery, with procmail's syntax
(procmailrc(5), procmailex(5)) and, as far as a program without a shell can, its
results. `parse` turns rcfile text into a frozen `Rcfile`; `run` walks it for one
message. The engine decides; an `Executor` supplied by the caller performs every
effect: appending to an mbox, writing a Maildir file, queueing a forward, running a
program, logging. Everything is blocking; the caller runs `run` in a worker thread.
Not here: where a user's rcfile lives and whether they may have one, the mailbox
writers, the MTA queue, the program sandbox (all the caller's).

Supported: recipes ``:0 [flags] [: [lockfile]]`` with the flags H B D A a E e h b f c
w W i r; conditions (``*``) with procmail's egrep dialect, ``^TO_`` ``^TO``
``^FROM_DAEMON`` ``^FROM_MAILER``, ``\\<`` ``\\>``, ``^^``, ``\\/`` (MATCH), ``!``,
``$`` (expanded first), ``< N`` / ``> N``, ``VAR ?? regex`` (and ``H`` ``B`` ``HB``
``??``), ``?`` program exit codes; actions: an mbox file, a Maildir folder (``name/``),
``/dev/null``, ``! addresses``, ``| program``, ``VAR=| program``, ``f`` filters, nested
``{ }`` blocks (``c`` on a block runs a clone); variable assignments with sh-like
quoting and ``$VAR ${VAR} ${VAR:-x} ${VAR:+x} ${VAR-x} ${VAR+x} $\\VAR $_ $- $$``,
backquotes; MAILDIR, DEFAULT, LOGFILE, LOG, INCLUDERC, SWITCHRC, HOME, LOGNAME, SENDER,
LASTFOLDER, MATCH. Old-style ``:N`` recipes (N condition lines without ``*``) too.

Semantics worth knowing (as procmail):

- The message is seen with a ``From <sender>  <ctime>`` line in front (procmail's
  ``-f sender``); header conditions see it, size conditions count it, pipes and
  filters receive it; mbox and Maildir writes and forwards leave it off. Header
  conditions see continued header lines joined with a space. ``^`` and ``$`` match a
  newline (the searched area is treated as if it had one before and after it), so
  ``.`` and ``[^...]`` never cross lines; matching ignores case unless ``D``.
- Folders are created on demand, but only their last component: the directory a
  folder lives in must exist (``lists/devel/`` fails while ``lists/`` does not
  exist). Relative names are relative to MAILDIR.
- A delivering recipe that succeeds ends processing unless ``c``. One that fails (the
  executor raised, the program exited non-zero under ``w``, pipes are disabled...) is
  logged and processing simply continues, so the message falls through to later
  recipes and finally to DEFAULT. Without ``w`` a program's exit code is ignored.
- When processing falls off the end, the engine delivers to DEFAULT itself (mbox with
  the lock, or Maildir when DEFAULT ends in ``/``), so ``Result.delivered`` is True
  unless that failed too; then (or with ``deliver_default=False``) the caller
  delivers ``Result.message`` itself. The message is never dropped silently: only a
  recipe the user wrote (``/dev/null``, a program without ``w``) can discard it.

Security stance: recipe paths are the user's own choice, but every write goes
through the `Executor`, which confines it (`confine` helps: resolve symlinks, raise
`PermissionError` outside the user's tree); the engine turns any exception from the
executor into a failed delivery and never crashes. Programs are never run through a
shell (DESIGN invariant 4) and only when the caller allows them; with
``allow_pipes`` the user runs programs of their choice with the executor's identity,
so the executor must sandbox them (user id, timeout, resource limits). INCLUDERC
files are read with ``read_file`` (regular files only, size-capped); error messages
never quote their text. LOGFILE is written by the engine itself, append-only, and
only inside the HOME given in ``env`` (not the one the rcfile may assign). Work per
message is bounded (steps, clones, include depth); a runaway rcfile stops as if it
had ended, and DEFAULT gets the message.

Differences from procmail (intentional, found by running real procmail 3.23pre on
``tests/procmail_corpus``):

1. No shell. A program line is split into words by procmail's own quoting and
   ``$`` expansion rules and executed directly; a line that needs a shell (an
   unquoted ``&`` ``|`` ``;`` ``<`` ``>`` ``(`` ``)``) is refused and the recipe fails.
   Globs are passed literally; a leading ``~/`` becomes ``$HOME/``. SHELL,
   SHELLMETAS and SHELLFLAGS have no effect. Programs run in the current MAILDIR
   (``PWD`` in their environment).
2. Programs (``|``, ``f``, ``?``, ``VAR=|``, backquotes) run only with
   ``allow_pipes``; otherwise a ``|`` recipe fails (falls through), a filter leaves
   the message unchanged, a ``?`` condition is false and a backquote expands to
   nothing, each logged.
3. A program that cannot be started (or times out, or the executor raises) is a
   failed delivery even without ``w``; procmail counts it as delivered.
4. ``!`` hands the addresses and the message to the MTA's queue (`Executor.forward`);
   SENDMAIL and SENDMAILFLAGS are not run.
5. mbox From_ lines are monomail's (envelope sender, arrival time), written by the
   executor on every mbox delivery: also after a filter removed or rewrote the From_
   line, and for a body-only (``b``) delivery, where procmail writes no From_ line.
6. mbox quoting is monomail's mboxrd (``>*From `` gets one more ``>``), procmail's is
   mboxo (only ``From `` is quoted); ``r`` does not turn quoting or the separating
   empty line off for mbox. A ``Content-Length:`` field is never rewritten (procmail
   rewrites it unless ``-Y``).
7. Folders are mbox files and Maildirs (``name/``). MH folders (``name/.``) and
   plain directories (an existing directory named without ``/``) fail. More
   Maildir folders after a Maildir folder each get a copy (procmail hardlinks);
   other extra names are skipped (procmail makes them directory folders).
8. Locking is the executor's: ``:`` asks it to lock the mbox; a named local
   lockfile is not created; LOCKFILE, LOCKEXT, LOCKSLEEP, LOCKTIMEOUT do nothing.
   As in procmail, a lock on a program recipe implies ``W``.
9. Stricter parsing: weighted scoring conditions (``* 2^1 regex``), unknown flag
   letters, text after the lockfile name, an unexpected ``}``, a missing ``}``, an
   unterminated quote, a recipe without an action, ``VAR=! ...`` and an invalid
   regular expression raise `RecipeError`; procmail warns and carries on. An
   INCLUDERC or SWITCHRC file with such an error is skipped whole (logged).
10. Regular expressions run on Python's ``re`` after translation. ``\\/`` must be
    outside parentheses; MATCH takes the left part as short as possible and the
    right part as long as possible, which is procmail's result for the usual
    idioms. ``^^`` anchors at the end when only ``)`` follow it, else at the start.
    A pathological pattern (nested repetition) can backtrack for long; procmail's
    matcher is linear.
11. ``c`` on a block: procmail forks a clone that runs concurrently; here the clone
    runs the block and the rest of the rcfile (and DEFAULT) to completion first,
    then the parent continues after the block. At most 16 clones per message.
12. ``i`` does not turn a failed mbox or Maildir write into a success (procmail
    does); it only forgives a program that closes its input early.
13. Not implemented (plain variables here): HOST, DELIVERED, EXITCODE, TRAP, UMASK,
    LINEBUF, SHIFT, DROPPRIVS, COMSAT, VERBOSE, TIMEOUT (the executor's business),
    ORGMAIL (when DEFAULT fails, the caller delivers). ``$#`` and ``$=`` are 0,
    positional ``$1``... are empty, ``$$`` is monomail's pid.
14. LOGFILE must resolve inside HOME or it is ignored (logged). It receives LOG
    text, monomail's error lines and procmail's end-of-delivery abstract (From_,
    Subject, Folder lines, or for every delivery with LOGABSTRACT=all); no VERBOSE
    output.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = [
    "Assignment", "Condition", "Executor", "Rcfile", "Recipe", "RecipeError", "Result",
    "confine", "parse", "read_rcfile", "run",
]

FLAGS = "HBDAahbfcwWiEer"
MAX_STEPS = 20_000  # statements executed per message, clones included
MAX_CLONES = 16
MAX_RCFILES = 16  # INCLUDERC nesting
MAX_BLOCK_DEPTH = 64
MAX_RCFILE = 256 * 1024  # bytes; INCLUDERC and SWITCHRC files are read whole

# The macros, exactly as procmail's config.h spells them (procmailrc(5), MISCELLANEOUS).
TO_ = r"(^((Original-)?(Resent-)?(To|Cc|Bcc)|(X-Envelope|Apparently(-Resent)?)-To):(.*[^-a-zA-Z0-9_.])?)"
TO = r"(^((Original-)?(Resent-)?(To|Cc|Bcc)|(X-Envelope|Apparently(-Resent)?)-To):(.*[^a-zA-Z])?)"
FROM_DAEMON = (
    "(^(Mailing-List:|Precedence:.*(junk|bulk|list)|To: Multiple recipients of |"
    "(((Resent-)?(From|Sender)|X-Envelope-From):|>?From )([^>]*[^(.%@a-z0-9])?("
    "Post(ma?(st(e?r)?|n)|office)|(send)?Mail(er)?|daemon|m(mdf|ajordomo)|n?uucp|"
    "LIST(SERV|proc)|NETSERV|o(wner|ps)|r(e(quest|sponse)|oot)|b(ounce|bs\\.smtp)|"
    "echo|mirror|s(erv(ices?|er)|mtp(error)?|ystem)|"
    "A(dmin(istrator)?|MMGR|utoanswer)"
    ")(([^).!:a-z0-9][-_a-z0-9]*)?[%@>\t ][^<)]*(\\(.*\\).*)?)?$([^>]|$)))"
)
FROM_MAILER = (
    "(^(((Resent-)?(From|Sender)|X-Envelope-From):|"
    ">?From )([^>]*[^(.%@a-z0-9])?("
    "Post(ma(st(er)?|n)|office)|(send)?Mail(er)?|daemon|mmdf|n?uucp|ops|"
    "r(esponse|oot)|(bbs\\.)?smtp(error)?|s(erv(ices?|er)|ystem)|A(dmin(istrator)?|"
    "MMGR)"
    ")(([^).!:a-z0-9][-_a-z0-9]*)?[%@>\t ][^<)]*(\\(.*\\).*)?)?$([^>]|$))"
)
_MACROS = (("^FROM_DAEMON", FROM_DAEMON), ("^TO_", TO_), ("^TO", TO), ("^FROM_MAILER", FROM_MAILER))

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CAPTURE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*([|!])")
_VARTEST = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*\?\?")
_NUMBER = r"[ \t]*[+-]?(?:[0-9]+(?:[.,][0-9]*)?|[.,][0-9]+)"
_SCORE = re.compile(_NUMBER + r"[ \t]*\^" + _NUMBER)
_SIZE = re.compile(r"[<>][ \t\n]*([+-]?[0-9]+)")
_SHELL_ONLY = frozenset("&|<>;()")


class RecipeError(Exception):
    """A syntax error in an rcfile; the message starts with ``name:line:``."""

    def __init__(self, name: str, line: int, reason: str) -> None:
        super().__init__(f"{name}:{line}: {reason}")
        self.name = name
        self.line = line
        self.reason = reason


# ---------------------------------------------------------------------------- the parsed form


@dataclass(frozen=True, slots=True)
class Assignment:
    """``NAME=value`` (``value`` is the raw text, expanded when run) or ``NAME`` (unset)."""

    name: str
    value: str | None
    line: int


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``*`` line: the text after the star, trimmed, continuation lines joined."""

    text: str
    line: int


@dataclass(frozen=True, slots=True)
class Recipe:
    """One ``:0`` recipe.

    ``kind`` is ``folder`` (``action`` holds the raw folder words), ``forward`` (raw
    addresses), ``pipe`` (the raw command line; ``capture`` names the variable of a
    ``VAR=| cmd`` recipe) or ``block`` (``block`` holds the nested statements).
    """

    flags: frozenset[str]
    lock: bool
    lockfile: str
    conditions: tuple[Condition, ...]
    kind: str
    action: str = ""
    capture: str = ""
    block: tuple[Assignment | Recipe, ...] = ()
    line: int = 0


Statement = Assignment | Recipe


@dataclass(frozen=True, slots=True)
class Rcfile:
    """A parsed rcfile: assignments and recipes in order (INCLUDERC is read when run)."""

    name: str
    statements: tuple[Statement, ...]


# ---------------------------------------------------------------------------- the parser

_NOTHING, _SKIP, _NORMAL, _DQ, _SQ = -1, 0, 1, 2, 3


def parse(text: str, name: str = "procmailrc") -> Rcfile:
    """Parse rcfile text; `RecipeError` (with ``name:line``) on a syntax error."""
    return Rcfile(name, _Parser(text, name).statements(0, 0))


class _Parser:
    """procmail's rcfile reader: a character stream, statement by statement."""

    def __init__(self, text: str, name: str) -> None:
        self.s = text
        self.i = 0
        self.name = name
        self._newlines = [k for k, ch in enumerate(text) if ch == "\n"]

    @property
    def line(self) -> int:
        return bisect.bisect_left(self._newlines, self.i) + 1

    def error(self, reason: str, line: int | None = None) -> RecipeError:
        return RecipeError(self.name, line or self.line, reason)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def skip_blanks(self) -> None:
        while self.peek() in (" ", "\t"):
            self.i += 1

    def skip_line(self) -> None:
        j = self.s.find("\n", self.i)
        self.i = len(self.s) if j < 0 else j + 1

    def statements(self, depth: int, open_line: int) -> tuple[Statement, ...]:
        out: list[Statement] = []
        while True:
            while self.peek() in (" ", "\t", "\n"):
                self.i += 1
            c = self.peek()
            if c == "#":
                self.skip_line()
            elif c == "":
                if depth:
                    raise self.error("missing '}' for the block opened here", open_line)
                return tuple(out)
            elif c == ":":
                out.append(self.recipe(depth))
            elif c == "}":
                if not depth:
                    raise self.error("unexpected '}'")
                self.i += 1
                return tuple(out)
            else:
                out.append(self.assignment())

    def assignment(self) -> Assignment:
        line = self.line
        m = _IDENT.match(self.s, self.i)
        if not m or self.s[m.end():m.end() + 1] not in ("", " ", "\t", "\n", "="):
            # (the text itself is not quoted: INCLUDERC may point at any file)
            raise self.error("expected a recipe (':0'), an assignment or a comment")
        self.i = m.end()
        self.skip_blanks()
        if self.peek() != "=":
            return Assignment(m.group(), None, line)
        self.i += 1
        self.skip_blanks()
        return Assignment(m.group(), self.extent(one_word=True), line)

    def extent(self, *, one_word: bool) -> str:
        """The raw text procmail's sh-like reader would consume: up to an unquoted
        newline (or, for an assignment, unquoted blank), without a trailing comment."""
        s, i, n = self.s, self.i, len(self.s)
        start, quote_line, state = i, self.line, _NOTHING
        while i < n:
            c = s[i]
            if state == _SQ:
                if c == "'":
                    state = _NORMAL
                i += 1
                continue
            if c == "\\":
                if s[i + 1:i + 2] != "\n" and state <= _SKIP:
                    state = _NORMAL
                i += 2
                continue
            if c == "`":
                j = i + 1
                while j < n and s[j] != "`" and not (s[j] == '"' and state == _DQ):
                    j += 2 if s[j] == "\\" else 1
                if j >= n:
                    self.i = n
                    raise self.error("unterminated backquote", quote_line)
                i = j + 1 if s[j] == "`" else j
                state = _NORMAL if state <= _SKIP else state
                continue
            if c == '"':
                state = _NORMAL if state == _DQ else _DQ
                quote_line = self.line_at(i)
                i += 1
                continue
            if state == _DQ:
                i += 1
                continue
            if c == "'":
                state, quote_line = _SQ, self.line_at(i)
                i += 1
                continue
            if c == "#" and state <= _SKIP:
                end = i
                j = s.find("\n", i)
                self.i = n if j < 0 else j
                return s[start:end]
            if c in " \t":
                if one_word and state == _NORMAL:
                    break
                state = _SKIP
                i += 1
                continue
            if c == "\n":
                break
            state = _NORMAL
            i += 1
        if state in (_DQ, _SQ):
            self.i = n
            raise self.error("unterminated quote", quote_line)
        self.i = i
        return s[start:i]

    def line_at(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def logical_line(self) -> str:
        """One line, continued while it ends in a backslash (procmail's getlline)."""
        out = ""
        while True:
            j = self.s.find("\n", self.i)
            if j < 0:
                line, self.i = self.s[self.i:], len(self.s)
                return out + line
            line, self.i = self.s[self.i:j], j + 1
            if not line.endswith("\\"):
                return out + line
            out += (line if len(line) > 1 else "") + "\n"

    def recipe(self, depth: int) -> Recipe:
        line = self.line
        self.i += 1
        head = " ".join(self.extent(one_word=False).split())
        if self.peek() == "\n":
            self.i += 1
        m = re.match(r"[+-]?[0-9]+", head)
        rest = head[m.end():] if m else head
        flags: set[str] = set()
        lock, lockfile = False, ""
        for k, c in enumerate(rest):
            if c == " ":
                continue
            if c == ":":
                lock = True
                words = rest[k + 1:].split()
                if len(words) > 1:
                    raise self.error(f"unexpected text after the lockfile name: {' '.join(words[1:])!r}", line)
                lockfile = words[0] if words else ""
                break
            if c not in FLAGS:
                raise self.error(f"unknown flag {c!r} (flags are {FLAGS})", line)
            flags.add(c)
        # ':' without a number: one old-style condition line, unless A, a, E or e
        nrcond = int(m.group()) if m else 0 if flags & set("AaEe") else 1
        conditions = self.conditions(nrcond, line)
        kind, action, capture, block = self.action(depth, line)
        return Recipe(frozenset(flags), lock, lockfile, conditions, kind, action, capture, block, line)

    def conditions(self, nrcond: int, recipe_line: int) -> tuple[Condition, ...]:
        out: list[Condition] = []
        while True:
            self.skip_blanks()
            nrcond -= 1
            line = self.line
            if self.peek() == "*" or nrcond >= 0:
                if self.peek() == "*":
                    self.i += 1
                self.skip_blanks()
                text = _squeeze(self.logical_line().rstrip(" \t"))
                try:
                    _check_condition(text)
                except ValueError as exc:
                    raise self.error(str(exc), line) from None
                out.append(Condition(text, line))
                continue
            c = self.peek()
            if c == "#":
                self.skip_line()
            elif c == "\n":
                self.i += 1
            elif c in ("", ":", "}"):
                raise self.error("recipe without an action", recipe_line)
            else:
                return tuple(out)

    def action(self, depth: int, recipe_line: int) -> tuple[str, str, str, tuple[Statement, ...]]:
        self.skip_blanks()
        line = self.line
        c = self.peek()
        if c == "!":
            self.i += 1
            raw = self.extent(one_word=False)
            if not raw.strip():
                raise self.error("'!' without an address", line)
            return "forward", raw, "", ()
        if c == "|":
            self.i += 1
            raw = self.logical_line()
            if not raw.strip():
                raise self.error("'|' without a program (a pipe to stdout is not supported)", line)
            return "pipe", raw, "", ()
        if c == "{" and self.peek(1) in (" ", "\t", "\n"):
            if depth >= MAX_BLOCK_DEPTH:
                raise self.error("blocks nested too deeply", line)
            self.i += 1
            return "block", "", "", self.statements(depth + 1, line)
        m = _CAPTURE.match(self.s, self.i)
        if m:
            if m.group(2) == "!":
                raise self.error("capturing a forward's output (VAR=! ...) is not supported", line)
            self.i = m.end()
            raw = self.logical_line()
            if not raw.strip():
                raise self.error("'|' without a program", line)
            return "pipe", raw, m.group(1), ()
        raw = self.extent(one_word=False)
        if not raw.strip():
            raise self.error("recipe without an action", recipe_line)
        return "folder", raw, "", ()


def _squeeze(text: str) -> str:
    """Drop backslash-newline pairs and the blanks that start a continued line."""
    out: list[str] = []
    state = 0
    for ch in text:
        if ch == "\n":
            if state == 1:
                out.pop()
            else:
                out.append(ch)
            state = 2
        elif ch == "\\":
            out.append(ch)
            state = 1
        elif ch in " \t" and state == 2:
            continue
        else:
            out.append(ch)
            state = 0
    return "".join(out)


def _check_condition(text: str) -> None:
    """Reject at parse time what would fail at run time (ValueError), as far as a
    condition can be judged before ``$`` expansion."""
    t = text
    while True:
        c = t[:1]
        if c == "$":
            return
        if c == "!":
            t = t[1:].lstrip(" \t")
            continue
        if c == "?":
            if not t[1:].strip():
                raise ValueError("'?' without a program")
            return
        if c in ("<", ">"):
            if "$" not in t and not _SIZE.match(t):
                raise ValueError(f"size condition without a number: {t!r}")
            return
        if _SCORE.match(t):
            raise ValueError("weighted scoring conditions (w^x) are not supported")
        m = _VARTEST.match(t)
        if m:
            t = t[m.end():].lstrip(" \t")
            continue
        if c == "\\":
            t = t[1:]
        _compile(t, True)
        return


# ---------------------------------------------------------------------------- regular expressions


@dataclass(frozen=True, slots=True)
class _Regex:
    rx: re.Pattern[bytes]
    captures: bool  # has a \/ (MATCH) group


def _macros(pattern: str) -> tuple[str, bool]:
    """Substitute ^TO_, ^TO, ^FROM_DAEMON, ^FROM_MAILER (not when escaped)."""
    nocase = False
    changed = True
    while changed:
        changed = False
        for key, subst in _MACROS:
            k = pattern.find(key)
            while k > 0 and pattern[k - 1] == "\\":
                k = pattern.find(key, k + 1)
            if k >= 0:
                pattern = pattern[:k] + subst + pattern[k + len(key):]
                nocase = nocase or key == "^FROM_DAEMON"
                changed = True
                break
    return pattern, nocase


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str, nocase: bool) -> _Regex:
    """procmail's egrep dialect to a Python bytes regex, matched against the search
    area with a newline added before and after it; ValueError if invalid."""
    text, force = _macros(pattern)
    py, captures = _translate(text.encode("utf-8", "surrogateescape"), pattern)
    try:
        rx = re.compile(py, re.IGNORECASE if nocase or force else 0)
    except re.error as exc:  # pragma: no cover - _translate emits valid syntax
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    return _Regex(rx, captures)


def _class(p: bytes, i: int) -> tuple[bytes, int]:
    """A bracket expression starting after ``[``: procmail rules (no escapes, no
    named classes; ``]`` or ``-`` first is literal; ``[^...]`` never matches a newline)."""
    n = len(p)
    negate = i < n and p[i] == ord("^")
    if negate:
        i += 1
    members: set[int] = set()
    prev = -1
    if i < n and p[i] in (ord("]"), ord("-")):
        prev = p[i]
        members.add(prev)
        i += 1
    while i < n:
        ch = p[i]
        if ch == ord("]"):
            i += 1
            break
        if ch == ord("-") and i + 1 < n and p[i + 1] != ord("]"):
            end = p[i + 1]
            members.update(range(prev + 1, end + 1))
            members.add(end)
            prev = end
            i += 2
            continue
        members.add(ch)
        prev = ch
        i += 1
    body = b"".join(b"\\x%02x" % m for m in sorted(members))
    if negate:
        return b"[^" + body + b"\\n]", i
    return (b"[" + body + b"]" if body else b"(?!)"), i


def _translate(p: bytes, original: str) -> tuple[bytes, bool]:
    tokens: list[tuple[str, bytes]] = []  # kind: atom, quant, open, close, alt, split
    depth = 0
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        prev = tokens[-1][0] if tokens else ""
        if c == ord("^") and p[i + 1:i + 2] == b"^":
            rest = p[i + 2:]
            at_end = rest.strip(b")") == b""
            tokens.append(("atom", b"(?:\\n\\Z)" if at_end else b"(?:\\A\\n)"))
            i += 2
        elif c in (ord("^"), ord("$")):
            tokens.append(("atom", b"\\n"))
            i += 1
        elif c == ord("."):
            tokens.append(("atom", b"[^\\n]"))
            i += 1
        elif c == ord("["):
            cls, i = _class(p, i + 1)
            tokens.append(("atom", cls))
        elif c == ord("\\"):
            nxt = p[i + 1:i + 2]
            if nxt == b"/":
                if depth:
                    raise ValueError(f"\\/ inside parentheses is not supported: {original!r}")
                if any(k == "split" for k, _ in tokens):
                    raise ValueError(f"more than one \\/ in {original!r}")
                tokens.append(("split", b""))
            elif nxt in (b"<", b">"):
                tokens.append(("atom", b"[^a-zA-Z0-9_]"))
            else:
                tokens.append(("atom", re.escape(nxt or b"\\")))
            i += 2
        elif c == ord("("):
            depth += 1
            tokens.append(("open", b"(?:"))
            i += 1
        elif c == ord(")"):
            if not depth:
                raise ValueError(f"unbalanced ')' in {original!r}")
            depth -= 1
            tokens.append(("close", b")"))
            i += 1
        elif c == ord("|"):
            tokens.append(("alt", b"|"))
            i += 1
        elif c in b"*+?" and prev in ("atom", "close"):
            tokens.append(("quant", bytes([c])))
            i += 1
        else:
            tokens.append(("atom", re.escape(bytes([c]))))
            i += 1
    if depth:
        raise ValueError(f"unbalanced '(' in {original!r}")
    out: list[bytes] = []
    lazy = any(k == "split" for k, _ in tokens)
    for kind, text in tokens:
        if kind == "split":
            out.append(b"(")
            lazy = False
        elif kind == "quant" and lazy:
            out.append(text + b"?")
        else:
            out.append(text)
    captures = not lazy and any(k == "split" for k, _ in tokens)
    if captures:
        out.append(b")")
    return b"".join(out), captures


# ---------------------------------------------------------------------------- the message


def _layout(mail: bytes) -> tuple[int, tuple[int, ...]]:
    """Where the body starts, and the newlines that continue header fields (procmail's
    readmail: the header ends at the first empty line)."""
    n = len(mail)
    p = 0
    while p < n and mail[p] == 10:
        p += 1
    p = min(p + 1, n)
    continued: list[int] = []
    while True:
        q = mail.find(b"\n", p)
        if q < 0:
            return n, tuple(continued)
        nxt = mail[q + 1:q + 2]
        if nxt in (b" ", b"\t"):
            continued.append(q)
        elif nxt == b"\n":
            return q + 2, tuple(continued)
        p = q + 1


def _skip_from(data: bytes) -> bytes:
    if not data.startswith(b"From "):
        return data
    nl = data.find(b"\n")
    return b"" if nl < 0 else data[nl + 1:]


def _terminate(data: bytes) -> bytes:
    """What procmail writes to programs and forwards: the text ends with an empty line."""
    return data if data.endswith(b"\n\n") else data + b"\n"


# ---------------------------------------------------------------------------- the executor


class Executor(Protocol):
    """Performs the effects the engine decides on. All blocking (a worker thread).

    Any exception means "this delivery failed": the engine logs it and goes on with
    the rcfile, procmail style. Raise `PermissionError` for a path outside what the
    user may write (`confine`).
    """

    def to_mbox(self, path: Path, message: bytes, lock: bool) -> None:
        """Append ``message`` (no From_ line; LF endings) to the mbox at ``path``,
        writing the From_ line, the quoting and the separating empty line; lock the
        mbox when ``lock``."""

    def to_maildir(self, path: Path, message: bytes) -> str:
        """Store ``message`` as a new file in the Maildir ``path`` (creating
        tmp/new/cur); return the file name."""

    def forward(self, addresses: list[str], message: bytes) -> None:
        """Queue ``message`` for ``addresses`` (the MTA's queue, not a sendmail run)."""

    def pipe(self, argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
        """Run ``argv`` (never through a shell) in the directory ``env["PWD"]`` with
        ``message`` on stdin and ``env`` as its environment; return the exit code and
        (when ``capture``) its stdout. Enforce a timeout (raise TimeoutError)."""

    def log(self, line: str) -> None:
        """One line of what the engine did, for monomail's log."""


def read_rcfile(path: Path) -> str:
    """The default INCLUDERC/SWITCHRC reader: a regular file (never a FIFO or a
    device, which could block or never end) of at most MAX_RCFILE bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > MAX_RCFILE:
                raise OSError(f"{path}: larger than {MAX_RCFILE} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def confine(path: Path, roots: Sequence[Path]) -> Path:
    """``path`` with symlinks resolved, if it lies inside one of ``roots`` (also
    resolved); else `PermissionError`. For executors: ``confine(path, [home])``."""
    real = Path(os.path.realpath(path))
    for root in roots:
        top = Path(os.path.realpath(root))
        if real == top or top in real.parents:
            return real
    raise PermissionError(f"{path}: outside {', '.join(str(r) for r in roots)}")


@dataclass(frozen=True)
class Result:
    """What `run` came to.

    ``delivered``: a delivering recipe completed, or DEFAULT was written; if False the
    caller delivers ``message`` to the user's mailbox itself. ``message``: the message
    after any filters (no From_ line). ``actions``: one line per thing done or failed,
    in order; ``errors``: the failures and refusals among them.
    """

    delivered: bool
    message: bytes
    actions: tuple[str, ...]
    errors: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- running


@dataclass
class _Shared:
    """State shared by a run and its clones."""

    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    steps: int = 0
    clones: int = 0


@dataclass
class _Frame:
    items: tuple[Statement, ...]
    pos: int
    kind: str  # "file" | "block"
    name: str
    ifdepth: int


def run(
    rc: Rcfile,
    message: bytes,
    env: dict[str, str],
    executor: Executor,
    *,
    read_file: Callable[[Path], str] | None = None,
    allow_pipes: bool = False,
    sender: str = "",
    when: float | None = None,
    deliver_default: bool = True,
) -> Result:
    """Run ``rc`` on ``message`` (LF endings, no From_ line) for the user described by
    ``env`` (HOME, LOGNAME, MAILDIR, DEFAULT, SENDER, ...).

    ``read_file`` reads INCLUDERC/SWITCHRC files (default `read_rcfile`: regular files
    up to MAX_RCFILE bytes, anywhere the process may read; pass a confined reader to
    limit where); ``allow_pipes`` lets the rcfile run programs through the executor;
    ``sender`` and ``when`` make the From_ line the recipes see
    (default: env SENDER, now). Never raises for anything the rcfile or the executor
    does; see `Result`.
    """
    engine = _Run(rc, message, env, executor, read_file or read_rcfile, allow_pipes,
                  sender, time.time() if when is None else when, deliver_default)
    try:
        engine.finish()
        engine.abstract()
    except Exception as exc:  # noqa: BLE001 - a bug here must not lose the message
        engine.error(f"internal error, recipes abandoned: {type(exc).__name__}: {exc}")
        return Result(False, message, tuple(engine.shared.actions), tuple(engine.shared.errors))
    return Result(engine.delivered, _skip_from(engine.mail), tuple(engine.shared.actions),
                  tuple(engine.shared.errors))


class _Run:
    """One pass over the rcfile for one message (a clone is another `_Run`)."""

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
        self.frames = [_Frame(rc.statements, 0, "file", rc.name, 0)]
        self.ifstack: list[tuple[bool, bool]] = []
        self.lastsucc = self.lastcond = self.prevcond = False
        self.delivered = False
        self.lastexit = 0
        self.logfile: Path | None = None
        self.shared = _Shared()
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

    def clone(self) -> _Run:
        other = copy.copy(self)
        other.vars = dict(self.vars)
        other.frames = [_Frame(f.items, f.pos, f.kind, f.name, f.ifdepth) for f in self.frames]
        other.ifstack = list(self.ifstack)
        other.tag = self.tag + "clone: "
        return other

    def body_offset(self) -> int:
        if self._lay_mail is not self.mail:
            self._lay, self._lay_mail = _layout(self.mail), self.mail
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

    def path(self, name: str) -> Path:
        return Path(name) if os.path.isabs(name) else Path(self.cwd, name)

    def env(self) -> dict[str, str]:
        return {**self.vars, "PWD": self.cwd}

    def set_lastfolder(self, name: str) -> None:
        self.vars["LASTFOLDER"] = name

    # ------------------------------------------------------------ the interpreter

    def finish(self) -> None:
        self.execute()
        if not self.delivered and self.deliver_default:
            default = self.vars.get("DEFAULT", "")
            if not default:
                self.error("DEFAULT is not set: not delivered")
            elif self.store(default, self.mail, True, lock=True, what="default"):
                self.delivered = True

    def execute(self) -> None:
        while self.frames and not self.delivered:
            frame = self.frames[-1]
            if frame.pos >= len(frame.items):
                self.frames.pop()
                if frame.kind == "block" and self.ifstack:
                    self.prevcond, self.lastcond = self.ifstack.pop()
                elif frame.kind == "file":
                    del self.ifstack[frame.ifdepth:]
                continue
            item = frame.items[frame.pos]
            frame.pos += 1
            self.shared.steps += 1
            if self.shared.steps > MAX_STEPS:
                self.error(f"more than {MAX_STEPS} steps: the rest of the rcfile is skipped")
                self.frames.clear()
                return
            if isinstance(item, Assignment):
                self.assign(item)
            else:
                self.recipe(item)

    def assign(self, a: Assignment) -> None:
        if a.value is None:
            self.vars.pop(a.name, None)
            self.special(a.name, None)
            return
        value = self.expand_one(a.value)
        self.vars[a.name] = value
        self.special(a.name, value)

    def special(self, name: str, value: str | None) -> None:
        if name == "MAILDIR" and value is not None:
            target = self.path(value)
            if value and os.path.isdir(target):
                self.cwd = str(target)
            else:
                self.error(f"couldn't chdir to {value!r}")
        elif name == "LOGFILE":
            self.set_logfile(value or "")
        elif name == "LOG" and value:
            self.executor_log(self.tag + "LOG: " + value.rstrip("\n"))
            self.logwrite(value)
        elif name == "INCLUDERC" and value:
            self.include(value)
        elif name == "SWITCHRC":
            self.switch(value or "")

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

    def load(self, value: str, what: str) -> Rcfile | None:
        path = self.path(value)
        try:
            text = self.read_file(path)
        except Exception as exc:  # noqa: BLE001 - the reader is the caller's
            self.error(f"couldn't read {what} {value}: {type(exc).__name__}: {exc}")
            return None
        try:
            return parse(text, str(path))
        except RecipeError as exc:
            self.error(f"{what} {value} skipped: {exc}")
            return None

    def include(self, value: str) -> None:
        if value == "/dev/null":
            return
        if sum(f.kind == "file" for f in self.frames) >= MAX_RCFILES:
            self.error(f"INCLUDERC {value} skipped: nested more than {MAX_RCFILES} deep")
            return
        rc = self.load(value, "INCLUDERC")
        if rc is not None and rc.statements:
            self.frames.append(_Frame(rc.statements, 0, "file", rc.name, len(self.ifstack)))

    def switch(self, value: str) -> None:
        idx = max(k for k, f in enumerate(self.frames) if f.kind == "file")
        ifdepth = self.frames[idx].ifdepth
        if value and value != "/dev/null":
            rc = self.load(value, "SWITCHRC")
            if rc is None:
                return  # as procmail: carry on with the current rcfile
            del self.ifstack[ifdepth:]
            self.frames[idx:] = [_Frame(rc.statements, 0, "file", rc.name, ifdepth)]
            return
        del self.ifstack[ifdepth:]
        del self.frames[idx:]

    # ------------------------------------------------------------ recipes

    def recipe(self, r: Recipe) -> None:
        flags = r.flags
        if "e" in flags and flags & {"E", "a"}:
            flags = flags - {"E", "a"}
            self.note(f"line {r.line}: 'e' overrides 'E' and 'a'")
        matched = self.conditions(r, flags)
        if not flags & {"A", "a"}:
            self.lastcond = matched
        if not self.prevcond or "E" not in flags:
            self.prevcond = matched
        if not matched:
            return
        if r.kind == "block":
            self.block(r, flags)
            return
        if r.kind == "folder":
            ok = self.folder(r, flags)
        elif r.kind == "forward":
            ok = self.forward(r, flags)
        else:
            ok = self.program(r, flags)
        delivering = r.kind != "pipe" or not (r.capture or "f" in flags)
        if ok and delivering:
            if "c" not in flags:
                self.delivered = True
            elif self.vars.get("LOGABSTRACT", "").lower().startswith("a"):
                self.abstract(force=True)
        self.lastsucc = ok

    def conditions(self, r: Recipe, flags: frozenset[str]) -> bool:
        ok = True
        if "e" in flags:
            ok = self.prevcond and not self.lastsucc
        if "E" in flags:
            ok = ok and not self.prevcond
        if "a" in flags:
            ok = ok and self.lastcond and self.lastsucc
        if "A" in flags:
            ok = ok and self.lastcond
        for cond in r.conditions:
            if not ok:
                break
            try:
                ok = self.test(cond.text, flags)
            except ValueError as exc:
                self.error(f"line {cond.line}: condition skipped as false: {exc}")
                ok = False
        return ok

    def test(self, text: str, flags: frozenset[str]) -> bool:
        negate = False
        kind = "HB" if {"H", "B"} <= flags else "B" if "B" in flags else "H"
        var: bytes | None = None
        while True:
            c = text[:1]
            if c == "$":
                text = self.expand_cond(text[1:]).lstrip(" \t")
                continue
            if c == "!":
                negate = not negate
                text = text[1:].lstrip(" \t")
                continue
            area = var
            if c == "?":
                data = area if area is not None else self.area(kind)
                code = self.run_test(text[1:], data)
                return code is not None and (code == 0) != negate
            if c in ("<", ">"):
                expanded = self.expand_cond(text, dq=False)
                m = _SIZE.match(expanded)
                pivot = int(m.group(1)) if m else 0
                size = len(area) if area is not None else len(self.mail)
                return (size < pivot if expanded[0] == "<" else size > pivot) != negate
            if _SCORE.match(text):
                raise ValueError("weighted scoring conditions (w^x) are not supported")
            m = _VARTEST.match(text)
            if m:
                name = m.group(1)
                if name in ("H", "B", "HB", "BH"):
                    var = self.area("HB" if name == "BH" else name)
                else:
                    var = self.vars.get(name, "").encode("utf-8", "surrogateescape")
                text = text[m.end():].lstrip(" \t")
                continue
            if c == "\\":
                text = text[1:]
            if not text:
                return not negate
            rx = _compile(text, "D" not in flags)
            return self.search(rx, area if area is not None else self.area(kind)) != negate

    def search(self, rx: _Regex, area: bytes) -> bool:
        padded = b"\n" + area + b"\n"
        m = rx.rx.search(padded)
        if m is None:
            return False
        if rx.captures:
            start, end = m.span(1)
            if padded[start:start + 1] == b"\n":
                start += 1
            end = min(max(end, start), len(padded) - 1)
            self.vars["MATCH"] = padded[start:end].decode("utf-8", "surrogateescape")
        return True

    def block(self, r: Recipe, flags: frozenset[str]) -> None:
        self.ifstack.append((self.prevcond, self.lastcond))
        if "c" not in flags:
            self.frames.append(_Frame(r.block, 0, "block", "", len(self.ifstack)))
            self.lastsucc = True
            return
        if self.shared.clones >= MAX_CLONES:
            self.ifstack.pop()
            self.error(f"line {r.line}: more than {MAX_CLONES} clones: block skipped")
            self.lastsucc = False
            return
        self.shared.clones += 1
        child = self.clone()
        child.lastsucc = True
        child.frames.append(_Frame(r.block, 0, "block", "", len(child.ifstack)))
        child.note(f"line {r.line}: running the block and the rest of the rcfile on a copy")
        child.finish()
        child.abstract()
        self.ifstack.pop()
        wait = bool(flags & {"w", "W"}) or r.lock
        self.lastsucc = child.delivered if wait else True

    def part(self, flags: frozenset[str]) -> tuple[bytes, bool]:
        """The text ``h``/``b`` select, and whether it starts at the From_ line."""
        h, b = "h" in flags, "b" in flags
        body = self.body_offset()
        if h and not b:
            return self.mail[:body], True
        if b and not h:
            return self.mail[body:], False
        return self.mail, True

    def folder(self, r: Recipe, flags: frozenset[str]) -> bool:
        words = self.expand_words(r.action)
        if not words:
            self.error(f"line {r.line}: the folder name expands to nothing")
            return False
        if "f" in flags:
            self.note(f"line {r.line}: 'f' on a folder ignored (the whole message is written)")
            data, at_start = self.mail, True
        else:
            data, at_start = self.part(flags)
        first, extra = words[0], words[1:]
        if not self.store(first, data, at_start, lock=r.lock, what=f"line {r.line}"):
            return False
        for name in extra:
            if first.endswith("/") and name.endswith("/"):
                self.store(name, data, at_start, lock=False, what=f"line {r.line}")
            else:
                self.note(f"line {r.line}: extra folder {name!r} skipped")
        return True

    def store(self, name: str, data: bytes, at_start: bool, *, lock: bool, what: str) -> bool:
        """Write ``data`` to the folder ``name`` through the executor; True if done."""
        if name == "/dev/null":
            self.set_lastfolder(name)
            self.note(f"{what}: discarded (/dev/null)")
            return True
        path = self.path(name)
        payload = _skip_from(data) if at_start else data
        try:
            if name.endswith("/."):
                raise ValueError("MH folders (name/.) are not supported")
            if not os.path.isdir(path.parent):  # as procmail: only the folder itself is created
                raise FileNotFoundError(f"no directory {path.parent}")
            if name.endswith("/"):
                fname = self.executor.to_maildir(path, payload)
                self.set_lastfolder(f"{name.rstrip('/')}/new/{fname}")
                self.note(f"{what}: maildir {path}/ {fname}")
            else:
                if os.path.isdir(path):
                    raise IsADirectoryError(f"{path} is a directory (end the name with / for a Maildir)")
                if payload.endswith(b"\n\n"):
                    payload = payload[:-1]  # the mbox separator is the executor's
                self.executor.to_mbox(path, payload, lock)
                self.set_lastfolder(name)
                self.note(f"{what}: mbox {path}")
        except Exception as exc:  # noqa: BLE001 - any executor failure is a failed delivery
            self.error(f"{what}: delivery to {name} failed: {type(exc).__name__}: {exc}")
            return False
        return True

    def forward(self, r: Recipe, flags: frozenset[str]) -> bool:
        addresses = self.expand_words(r.action)
        if "f" in flags:
            self.note(f"line {r.line}: 'f' on a forward ignored")
        if not addresses:
            self.error(f"line {r.line}: '!' expands to no address")
            return False
        data, at_start = self.part(flags)
        if at_start:
            data = _skip_from(data)
        if "r" not in flags:
            data = _terminate(data)
        try:
            self.executor.forward(list(addresses), data)
        except Exception as exc:  # noqa: BLE001 - any executor failure is a failed delivery
            self.error(f"line {r.line}: forward to {', '.join(addresses)} failed: {type(exc).__name__}: {exc}")
            return False
        self.set_lastfolder(" ".join([self.vars.get("SENDMAIL", ""), self.vars.get("SENDMAILFLAGS", ""),
                                      *addresses]).strip())
        self.note(f"line {r.line}: forwarded to {', '.join(addresses)}")
        return True

    def program(self, r: Recipe, flags: frozenset[str]) -> bool:
        """``| cmd`` (delivering), ``f`` filters and ``VAR=| cmd`` captures."""
        filtering = "f" in flags and not r.capture
        what = f"line {r.line}: " + ("filter" if filtering else "capture" if r.capture else "pipe")
        if "c" in flags and (filtering or r.capture):
            self.note(f"line {r.line}: 'c' on a filter ignored")
        if not self.allow_pipes:
            self.error(f"{what} not run (programs are disabled): |{r.action.strip()}")
            return False
        argv = self.argv(r.action, what)
        if not argv:
            return False
        data, _ = self.part(flags)
        if "r" not in flags:
            data = _terminate(data)
        wait = bool(flags & {"w", "W"}) or r.lock
        try:
            code, out = self.executor.pipe(argv, data, self.env(), filtering or bool(r.capture))
        except BrokenPipeError as exc:
            if "i" in flags and not wait and not filtering:
                self.note(f"{what} {argv[0]}: closed its input early (ignored, 'i')")
                return True
            self.error(f"{what} {argv[0]} failed: {type(exc).__name__}: {exc}")
            return False
        except Exception as exc:  # noqa: BLE001 - any executor failure is a failed delivery
            self.error(f"{what} {argv[0]} failed: {type(exc).__name__}: {exc}")
            return False
        self.lastexit = code
        if wait and code:
            self.error(f"{what} {argv[0]} exited {code}" + (": message unchanged" if filtering else ""))
            return False
        if r.capture:
            value = out.decode("utf-8", "surrogateescape")
            value = value[:-1] if value.endswith("\n") else value
            self.vars[r.capture] = value
            self.note(f"{what} {argv[0]} into {r.capture}")
            self.special(r.capture, value)
        elif filtering:
            h, b = "h" in flags, "b" in flags
            body = self.body_offset()
            if h and not b:
                self.mail = out + self.mail[body:]
            elif b and not h:
                self.mail = self.mail[:body] + out
            else:
                self.mail = out
            self.note(f"{what} {argv[0]} (exit {code})")
        else:
            self.set_lastfolder(r.action.strip())
            self.note(f"{what} {argv[0]} (exit {code})")
        return True

    def argv(self, raw: str, what: str) -> list[str] | None:
        """A command line as words, or None (logged) if it needs a shell."""
        metas = _unquoted_shell_chars(raw)
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
            code, _ = self.executor.pipe(argv, _terminate(data), self.env(), False)
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
            code, out = self.executor.pipe(argv, _terminate(self.mail), self.env(), True)
        except Exception as exc:  # noqa: BLE001
            self.error(f"{what} {argv[0]} failed: {type(exc).__name__}: {exc}")
            return ""
        self.lastexit = code
        return out.decode("utf-8", "surrogateescape").rstrip("\n")

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

    # ------------------------------------------------------------ expansion

    def expand_words(self, raw: str) -> list[str]:
        ex = _Expander(self, 0)
        ex.feed(raw)
        return ex.words_result()

    def expand_one(self, raw: str) -> str:
        ex = _Expander(self, 1)
        ex.feed(raw)
        return ex.text_result()

    def expand_cond(self, raw: str, dq: bool = True) -> str:
        ex = _Expander(self, 2, dq=dq)
        ex.feed(raw)
        return ex.text_result()

    def lookup(self, name: str) -> str | None:
        if name[:1].isdigit():
            return None
        return self.vars.get(name)


def _unquoted_shell_chars(raw: str) -> set[str]:
    """Shell syntax characters outside quotes (what only a shell could run)."""
    found: set[str] = set()
    state = _NORMAL
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if state == _SQ:
            state = _NORMAL if c == "'" else _SQ
        elif c == "\\":
            i += 1
        elif c == '"':
            state = _NORMAL if state == _DQ else _DQ
        elif state == _DQ:
            pass
        elif c == "'":
            state = _SQ
        elif c == "`":
            j = raw.find("`", i + 1)
            i = n if j < 0 else j
        elif c in _SHELL_ONLY:
            found.add(c)
        i += 1
    return found


class _Expander:
    """procmail's readparse: sh-like quoting and ``$`` substitution.

    ``sarg`` 0: split into words (unquoted substitutions split on blanks); 1: one
    assignment value (stops at an unquoted blank); 2: text with blanks collapsed to
    one space (conditions; ``dq`` starts inside double quotes, as ``* $`` does).
    """

    def __init__(self, engine: _Run, sarg: int, dq: bool = False) -> None:
        self.engine = engine
        self.sarg = sarg
        self.got = _DQ if dq else _NOTHING
        self.words: list[str] = []
        self.cur: list[str] | None = None
        self.brace = 0
        self.qbrace = 0
        self.done = False

    # output
    def _append(self, text: str) -> None:
        if self.cur is None:
            self.cur = []
        self.cur.append(text)

    def _lit(self, text: str) -> None:
        self._append(text)
        if self.got <= _SKIP:
            self.got = _NORMAL

    def _end_word(self) -> None:
        if self.cur is not None:
            self.words.append("".join(self.cur))
            self.cur = None

    def _sep(self) -> None:
        if self.sarg == 2:
            self._append(" ")
        else:
            self._end_word()
        self.got = _SKIP

    def _copy(self, value: str) -> None:
        self._append(value)
        if self.got <= _SKIP:
            self.got = _NORMAL

    def _value(self, value: str) -> None:
        if self.got == _DQ or self.sarg:
            self._copy(value)
            return
        for ch in value:
            if ch in " \t\n":
                if self.got > _SKIP:
                    self._end_word()
                    self.got = _SKIP
            else:
                self._append(ch)
                self.got = _NORMAL

    def words_result(self) -> list[str]:
        self._end_word()
        return self.words

    def text_result(self) -> str:
        self._end_word()
        return "".join(self.words)

    # input
    def feed(self, t: str) -> None:
        i, n = 0, len(t)
        while i < n and not self.done:
            c = t[i]
            i += 1
            got = self.got
            if got == _SQ:
                if c == "'":
                    self.got = _NORMAL
                else:
                    self._append(c)
                continue
            if c == "\\":
                if i >= n:
                    break
                d = t[i]
                i += 1
                if d == "\n":
                    continue
                if d == "#":
                    self._lit("\\#" if got > _SKIP else "#")
                elif d in " \t'":
                    self._lit("\\" + d if got == _DQ else d)
                elif d in '"\\$`' or d == "}" and (got <= _NORMAL and self.brace
                                                    or got == _DQ and self.brace > self.qbrace):
                    self._lit(d)
                else:
                    self._lit("\\" + d if got > _NORMAL else d)
                continue
            if c == "`":
                command, i, by_quote = self._backquote_text(t, i)
                out = self.engine.backquote(command)
                if self.got == _DQ:
                    self._copy(out)
                    if by_quote:
                        self.got = _NORMAL
                else:
                    self._value(out)
                continue
            if c == '"':
                if got == _DQ:
                    if self.qbrace < self.brace:
                        self._lit(c)
                    else:
                        self.got = _NORMAL
                    continue
                self.qbrace = self.brace
                if self.cur is None:
                    self.cur = []
                self.got = _DQ
                continue
            if c == "'":
                if got == _DQ:
                    self._lit(c)
                    continue
                if self.cur is None:
                    self.cur = []
                self.got = _SQ
                continue
            if c == "}" and (got <= _NORMAL and self.brace or got == _DQ and self.brace > self.qbrace):
                self.brace -= 1
                continue
            if c == "#" and got <= _SKIP:
                self.done = True
                break
            if c == "$":
                i = self._dollar(t, i)
                continue
            if c in " \t":
                if got == _NORMAL:
                    if self.sarg == 1:
                        self.done = True
                        break
                    self._sep()
                elif got > _NORMAL:
                    self._lit(c)
                continue
            if c == "\n":
                if got <= _NORMAL:
                    self.done = True
                    break
                self._lit(c)
                continue
            self._lit(c)

    def _backquote_text(self, t: str, i: int) -> tuple[str, int, bool]:
        out: list[str] = []
        n = len(t)
        while i < n:
            c = t[i]
            i += 1
            if c == '"' and self.got == _DQ:
                return "".join(out), i, True
            if c == "`":
                return "".join(out), i, False
            if c == "\\" and i < n:
                d = t[i]
                i += 1
                if d == "\n":
                    continue
                if d in "\\$`" or (d == '"' and self.got == _DQ):
                    out.append(d)
                else:
                    out.append("\\" + d)
                continue
            out.append(c)
        return "".join(out), i, False

    def _dollar(self, t: str, i: int) -> int:
        n = len(t)
        if i >= n:
            self._lit("$")
            return i
        d = t[i]
        engine = self.engine
        if d == "@":
            if self.got != _DQ:
                self._lit("@")
            return i + 1
        if d == "{":
            j = i + 1
            while j < n and (t[j].isalnum() or t[j] == "_") and t[j].isascii():
                j += 1
            name = t[i + 1:j]
            value = engine.lookup(name) if name else None
            op = t[j:j + 1]
            if op == "}":
                self._value(value or "")
                return j + 1
            if op == ":" and t[j + 1:j + 2] in ("-", "+"):
                alt_start = j + 2
                use_alt = (not value) if t[j + 1] == "-" else bool(value)
            elif op in ("-", "+"):
                alt_start = j + 1
                use_alt = (value is None) if op == "-" else (value is not None)
            else:
                engine.error(f"bad substitution of {t[i - 1:j + 1]!r}")
                return j
            end = _closing_brace(t, alt_start)
            if use_alt:
                self.brace += 1
                self.feed(t[alt_start:end])
                if self.brace:
                    self.brace -= 1
            else:
                plus = (t[j + 1] if op == ":" else op) == "+"
                self._value("" if plus else value or "")
            return end + 1
        if d == "$":
            self._copy(str(os.getpid()))
            return i + 1
        if d == "?":
            self._copy(str(engine.lastexit))
            return i + 1
        if d in "#=":
            self._copy("0")
            return i + 1
        if d == "_":
            name = next((f.name for f in reversed(engine.frames) if f.kind == "file"), "")
            self._value(name)
            return i + 1
        if d == "-":
            self._value(engine.vars.get("LASTFOLDER", ""))
            return i + 1
        if d.isdigit():
            self._value("")
            return i + 1
        quoted = d == "\\"
        j = i + 1 if quoted else i
        k = j
        while k < n and (t[k].isalnum() or t[k] == "_") and t[k].isascii():
            k += 1
        if k > j:
            value = engine.lookup(t[j:k]) or ""
            if quoted:
                self._copy("()" + "".join("\\" + ch if ch in "(|)*?+.^$[\\" else ch for ch in value))
            else:
                self._value(value)
            return k
        self._lit("$")
        return i  # not a substitution: the next character is read as usual


def _closing_brace(t: str, i: int) -> int:
    """Index of the ``}`` closing a ``${name:-...}`` whose text starts at ``i``."""
    depth, state, n = 1, _NORMAL, len(t)
    while i < n:
        c = t[i]
        if state == _SQ:
            if c == "'":
                state = _NORMAL
        elif c == "\\":
            i += 1
        elif c == '"':
            state = _NORMAL if state == _DQ else _DQ
        elif c == "'" and state != _DQ:
            state = _SQ
        elif c == "$" and t[i + 1:i + 2] == "{":
            depth += 1
            i += 1
        elif c == "}" and state != _DQ:
            depth -= 1
            if not depth:
                return i
        i += 1
    return n
