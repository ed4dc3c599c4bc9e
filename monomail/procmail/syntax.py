"""The parsed form of an rcfile, and the lexical shapes the parser and the engine share.

Job: the frozen dataclasses `parse` produces and `run` walks (`Rcfile`, `Assignment`,
`Recipe`, `Condition`), the shapes of a condition line that both the parser (to reject
at parse time what would fail at run time) and the engine (to evaluate) recognise, and
the quoting states of procmail's sh-like reader, used by the parser (to find where a
value ends) and by the expander (to expand it).

Not here: reading text (``parser``), evaluating anything (``engine``, ``expand``).

Follows procmailrc(5): RECIPES (``:0 [flags] [: [lockfile]]``, ``*`` conditions,
``VAR ?? regex``, ``< N`` / ``> N``, weighted ``w^x`` scoring) and ENVIRONMENT
(``NAME=value``); the quoting states are procmail's own (``goodies.c``, readparse).
This module imports nothing of ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The states of procmail's readparse (goodies.c: NOTHING_YET, SKIPPING_SPACE,
# NORMAL_TEXT, DOUBLE_QUOTED, SINGLE_QUOTED); ordered, code compares them.
NOTHING, SKIP, NORMAL, DQ, SQ = -1, 0, 1, 2, 3

VARTEST = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*\?\?")  # ``VAR ??`` (also H, B, HB)
_NUMBER = r"[ \t]*[+-]?(?:[0-9]+(?:[.,][0-9]*)?|[.,][0-9]+)"
SCORE = re.compile(_NUMBER + r"[ \t]*\^" + _NUMBER)  # ``w^x`` (refused: difference 9)
SIZE = re.compile(r"[<>][ \t\n]*([+-]?[0-9]+)")  # ``< N`` / ``> N``


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
