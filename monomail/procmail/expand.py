"""procmail's sh-like expansion of values, folder names, command lines and conditions.

Job: what procmail's ``readparse`` (goodies.c) does to text taken from an rcfile when
it is used: single and double quotes, backslash escapes, ``#`` comments, and the
substitutions ``$VAR ${VAR} ${VAR:-x} ${VAR:+x} ${VAR-x} ${VAR+x}`` (nested, quoted
alternatives), ``$\\VAR`` (the value quoted for a regular expression), ``$_`` (the
current rcfile), ``$-`` (LASTFOLDER), ``$?`` (the last exit code), ``$$`` (our pid),
``$#`` and ``$=`` (0), ``$1``... (empty) and backquotes (a program's output, through
`Context.backquote`). Three modes, as procmail's: `words` (a folder list, addresses,
a command line: unquoted substitutions split on blanks), `value` (an assignment: one
word) and `condition` (a ``*`` line: blanks collapse to one space; ``* $`` starts as
if inside double quotes). `unquoted_shell_chars` finds what only a shell could run
(difference 1 in the package docstring).

Not here: variables themselves, running programs, logging: the `Context` (the
engine's per-message state) supplies them. This module imports only ``syntax``.
"""

from __future__ import annotations

import os
from typing import Protocol

from .syntax import DQ, NORMAL, NOTHING, SKIP, SQ

_SHELL_ONLY = frozenset("&|<>;()")


class Context(Protocol):
    """What expansion reads from the run it expands for."""

    @property
    def lastexit(self) -> int:
        """``$?``: the exit code of the last program run."""

    @property
    def rcfile_name(self) -> str:
        """``$_``: the name of the rcfile being run."""

    def lookup(self, name: str) -> str | None:
        """A variable's value, or None if it is unset."""

    def backquote(self, command: str) -> str:
        """A backquoted command's output (trailing newlines removed), or "" (logged)."""

    def error(self, text: str) -> None:
        """Log a problem with the text being expanded."""


def words(ctx: Context, raw: str) -> list[str]:
    """``raw`` as words (folder names, addresses, a command line)."""
    ex = _Expander(ctx, 0)
    ex.feed(raw)
    return ex.words_result()


def value(ctx: Context, raw: str) -> str:
    """``raw`` as one assignment value."""
    ex = _Expander(ctx, 1)
    ex.feed(raw)
    return ex.text_result()


def condition(ctx: Context, raw: str, dq: bool = True) -> str:
    """``raw`` (a condition after its ``$``) as text, blanks collapsed; ``dq``: start
    inside double quotes."""
    ex = _Expander(ctx, 2, dq=dq)
    ex.feed(raw)
    return ex.text_result()


def unquoted_shell_chars(raw: str) -> set[str]:
    """Shell syntax characters outside quotes (what only a shell could run)."""
    found: set[str] = set()
    state = NORMAL
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if state == SQ:
            state = NORMAL if c == "'" else SQ
        elif c == "\\":
            i += 1
        elif c == '"':
            state = NORMAL if state == DQ else DQ
        elif state == DQ:
            pass
        elif c == "'":
            state = SQ
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

    def __init__(self, ctx: Context, sarg: int, dq: bool = False) -> None:
        self.ctx = ctx
        self.sarg = sarg
        self.got = DQ if dq else NOTHING
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
        if self.got <= SKIP:
            self.got = NORMAL

    def _end_word(self) -> None:
        if self.cur is not None:
            self.words.append("".join(self.cur))
            self.cur = None

    def _sep(self) -> None:
        if self.sarg == 2:
            self._append(" ")
        else:
            self._end_word()
        self.got = SKIP

    def _copy(self, value: str) -> None:
        self._append(value)
        if self.got <= SKIP:
            self.got = NORMAL

    def _value(self, value: str) -> None:
        if self.got == DQ or self.sarg:
            self._copy(value)
            return
        for ch in value:
            if ch in " \t\n":
                if self.got > SKIP:
                    self._end_word()
                    self.got = SKIP
            else:
                self._append(ch)
                self.got = NORMAL

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
            if got == SQ:
                if c == "'":
                    self.got = NORMAL
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
                    self._lit("\\#" if got > SKIP else "#")
                elif d in " \t'":
                    self._lit("\\" + d if got == DQ else d)
                elif d in '"\\$`' or d == "}" and (got <= NORMAL and self.brace
                                                    or got == DQ and self.brace > self.qbrace):
                    self._lit(d)
                else:
                    self._lit("\\" + d if got > NORMAL else d)
                continue
            if c == "`":
                command, i, by_quote = self._backquote_text(t, i)
                out = self.ctx.backquote(command)
                if self.got == DQ:
                    self._copy(out)
                    if by_quote:
                        self.got = NORMAL
                else:
                    self._value(out)
                continue
            if c == '"':
                if got == DQ:
                    if self.qbrace < self.brace:
                        self._lit(c)
                    else:
                        self.got = NORMAL
                    continue
                self.qbrace = self.brace
                if self.cur is None:
                    self.cur = []
                self.got = DQ
                continue
            if c == "'":
                if got == DQ:
                    self._lit(c)
                    continue
                if self.cur is None:
                    self.cur = []
                self.got = SQ
                continue
            if c == "}" and (got <= NORMAL and self.brace or got == DQ and self.brace > self.qbrace):
                self.brace -= 1
                continue
            if c == "#" and got <= SKIP:
                self.done = True
                break
            if c == "$":
                i = self._dollar(t, i)
                continue
            if c in " \t":
                if got == NORMAL:
                    if self.sarg == 1:
                        self.done = True
                        break
                    self._sep()
                elif got > NORMAL:
                    self._lit(c)
                continue
            if c == "\n":
                if got <= NORMAL:
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
            if c == '"' and self.got == DQ:
                return "".join(out), i, True
            if c == "`":
                return "".join(out), i, False
            if c == "\\" and i < n:
                d = t[i]
                i += 1
                if d == "\n":
                    continue
                if d in "\\$`" or (d == '"' and self.got == DQ):
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
        ctx = self.ctx
        if d == "@":
            if self.got != DQ:
                self._lit("@")
            return i + 1
        if d == "{":
            j = i + 1
            while j < n and (t[j].isalnum() or t[j] == "_") and t[j].isascii():
                j += 1
            name = t[i + 1:j]
            value = ctx.lookup(name) if name else None
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
                ctx.error(f"bad substitution of {t[i - 1:j + 1]!r}")
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
            self._copy(str(ctx.lastexit))
            return i + 1
        if d in "#=":
            self._copy("0")
            return i + 1
        if d == "_":
            self._value(ctx.rcfile_name)
            return i + 1
        if d == "-":
            self._value(ctx.lookup("LASTFOLDER") or "")
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
            value = ctx.lookup(t[j:k]) or ""
            if quoted:
                self._copy("()" + "".join("\\" + ch if ch in "(|)*?+.^$[\\" else ch for ch in value))
            else:
                self._value(value)
            return k
        self._lit("$")
        return i  # not a substitution: the next character is read as usual


def _closing_brace(t: str, i: int) -> int:
    """Index of the ``}`` closing a ``${name:-...}`` whose text starts at ``i``."""
    depth, state, n = 1, NORMAL, len(t)
    while i < n:
        c = t[i]
        if state == SQ:
            if c == "'":
                state = NORMAL
        elif c == "\\":
            i += 1
        elif c == '"':
            state = NORMAL if state == DQ else DQ
        elif c == "'" and state != DQ:
            state = SQ
        elif c == "$" and t[i + 1:i + 2] == "{":
            depth += 1
            i += 1
        elif c == "}" and state != DQ:
            depth -= 1
            if not depth:
                return i
        i += 1
    return n
