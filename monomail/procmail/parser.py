"""The rcfile parser: procmailrc text to a frozen `Rcfile`, or `RecipeError` with ``name:line:``.

Job: read an rcfile the way procmail's own reader does (procmailrc(5); procmail's
``cstdio.c``: getlline, skipline; ``goodies.c``: readparse), statement by statement: comments, ``NAME=value``
assignments (the raw value up to an unquoted blank, with sh-like quoting and
backquotes kept for the expander), ``:0 [flags] [: [lockfile]]`` recipes with their
``*`` conditions (backslash-newline continues a line) and one action: a folder,
``! addresses``, ``| program``, ``VAR=| program`` or a nested ``{ }`` block. Old-style
``:N`` recipes take N condition lines without ``*``. Each condition is checked here as
far as it can be before ``$`` expansion (its regular expression compiles, a size has a
number), so a bad rcfile is refused whole before it runs.

Stricter than procmail (difference 9 in the package docstring): weighted scoring,
unknown flags, text after the lockfile name, a stray or missing ``}``, an unterminated
quote or backquote, a recipe without an action, ``VAR=! ...`` and an invalid regular
expression are errors, where procmail warns and carries on. A line that is neither a
recipe, an assignment nor a comment is not quoted in the error (INCLUDERC may point at
any file, one holding secrets too).

Not here: expanding values (``expand``), running anything (``engine``), reading files
(the caller passes text; INCLUDERC files are read when run).
"""

from __future__ import annotations

import bisect
import re

from ..errors import RecipeError
from .egrep import compile_pattern
from .syntax import (
    DQ,
    NORMAL,
    NOTHING,
    SCORE,
    SIZE,
    SKIP,
    SQ,
    VARTEST,
    Assignment,
    Condition,
    Rcfile,
    Recipe,
    Statement,
)

FLAGS = "HBDAahbfcwWiEer"
MAX_BLOCK_DEPTH = 64

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CAPTURE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*([|!])")


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
        start, quote_line, state = i, self.line, NOTHING
        while i < n:
            c = s[i]
            if state == SQ:
                if c == "'":
                    state = NORMAL
                i += 1
                continue
            if c == "\\":
                if s[i + 1:i + 2] != "\n" and state <= SKIP:
                    state = NORMAL
                i += 2
                continue
            if c == "`":
                j = i + 1
                while j < n and s[j] != "`" and not (s[j] == '"' and state == DQ):
                    j += 2 if s[j] == "\\" else 1
                if j >= n:
                    self.i = n
                    raise self.error("unterminated backquote", quote_line)
                i = j + 1 if s[j] == "`" else j
                state = NORMAL if state <= SKIP else state
                continue
            if c == '"':
                state = NORMAL if state == DQ else DQ
                quote_line = self.line_at(i)
                i += 1
                continue
            if state == DQ:
                i += 1
                continue
            if c == "'":
                state, quote_line = SQ, self.line_at(i)
                i += 1
                continue
            if c == "#" and state <= SKIP:
                end = i
                j = s.find("\n", i)
                self.i = n if j < 0 else j
                return s[start:end]
            if c in " \t":
                if one_word and state == NORMAL:
                    break
                state = SKIP
                i += 1
                continue
            if c == "\n":
                break
            state = NORMAL
            i += 1
        if state in (DQ, SQ):
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
            if "$" not in t and not SIZE.match(t):
                raise ValueError(f"size condition without a number: {t!r}")
            return
        if SCORE.match(t):
            raise ValueError("weighted scoring conditions (w^x) are not supported")
        m = VARTEST.match(t)
        if m:
            t = t[m.end():].lstrip(" \t")
            continue
        if c == "\\":
            t = t[1:]
        compile_pattern(t, True)
        return

