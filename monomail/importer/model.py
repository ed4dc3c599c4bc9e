"""What the importer read, and where: the values its reading, translating and writing share.

Job: vocabulary inside the ``importer`` package. `Loc` names a file and line (reports
are sorted by it, so they follow the input); a `Target` is one translatable item of an
alias, virtual entry or .forward; `show` quotes input text for a report line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..settings import Discard, Refusal

# The same alphabet monomail.config holds user names to (they become path components).
USER_NAME = re.compile(r"[a-z0-9_][a-z0-9._\-]*\Z")
DOMAIN = re.compile(r"(?:[a-z0-9_\-\x80-\U0010ffff]+\.)*[a-z0-9_\-\x80-\U0010ffff]+\Z|\[[0-9a-f:.]+\]\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ImportResult:
    toml: str  # the generated monomail.toml fragment (valid TOML, with comments)
    report: tuple[str, ...]  # one line per thing that could not be translated


@dataclass(frozen=True, slots=True, order=True)
class Loc:
    """Where something was read: file and line (line 0: the file as a whole)."""

    seq: int  # order in which files were first read, so reports follow the input
    line: int
    file: str = field(compare=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True, slots=True)
class Target:
    raw: str  # as written, for the report
    where: Loc
    value: str  # a lower-case local name, or a full address local@domain ("" for a special)
    local: bool  # value is a local name (a user or an alias)
    noexpand: bool = False  # written \name
    special: Refusal | Discard | None = None  # :fail:, :defer:, :blackhole: (or /dev/null)
    null: bool = False  # /dev/null: discards alone, and is nothing beside other targets


@dataclass(slots=True)
class Alias:
    where: Loc
    targets: list[Target]


@dataclass(slots=True)
class Forward:
    where: Loc
    targets: list[Target]
    keep_copy: bool


@dataclass(frozen=True, slots=True)
class Resolved:
    value: str  # what goes into the TOML list
    target: Target
    via: str | None  # the alias name this value reaches first, if any


def show(text: str) -> str:
    """Input text quoted for a report or comment line: one line, control characters escaped."""
    return '"' + _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) + '"'


def comment(text: str) -> str:
    """Text for a TOML comment: control characters replaced."""
    return _CONTROL.sub("?", text)
