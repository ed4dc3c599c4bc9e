"""Reading the input files of ``monomail import`` into aliases, virtual entries and forwards.

Job: read an aliases file, a virtusertable and .forward files (and the ``:include:``
files they name) with the one address-list lexer (``addrlist``), keep what can be
translated as `Target` values, and report, by file and line, what cannot. It decides
what each item is (a local name, an address elsewhere, a refusal) but not what it
becomes in the TOML (``translate``).

Error handling: `Reader.read` raises `OSError` for a named input file that cannot be
read; a missing or unreadable ``:include:`` file is only reported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..addrlist import (
    Address,
    AliasEntry,
    Backslashed,
    File,
    Include,
    Item,
    Malformed,
    Pipe,
    parse_aliases,
    parse_list,
    strip_comment,
)
from ..settings import Discard, Refusal
from .model import DOMAIN, USER_NAME, Alias, Forward, Loc, Target, show

_SUBSTITUTION = re.compile(r"%\d")
_MAX_INCLUDE_DEPTH = 10
_PIPE = "(pipe to a program) not translated"
_FILE = "(delivery to a file) not translated"


class Reader:
    """The parsed input of one conversion, and what was reported while reading it."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.files: dict[str, int] = {}
        self.reports: list[tuple[Loc, int, str]] = []
        self.aliases: dict[str, Alias] = {}
        self.virtual: dict[str, dict[str, Target]] = {}
        self.virtual_where: dict[str, Loc] = {}
        self.forwards: dict[str, Forward] = {}
        self.sources: list[str] = []

    def loc(self, path: Path | str, line: int = 0) -> Loc:
        name = str(path)
        return Loc(self.files.setdefault(name, len(self.files)), line, name)

    def report(self, where: Loc, text: str) -> None:
        self.reports.append((where, len(self.reports), f"{where}: {text}"))

    def read(self, path: Path) -> str:
        self.loc(path)  # number the file in reading order
        return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")

    # -- items --------------------------------------------------------------------------

    def expand(self, items: Iterable[Item], path: Path, stack: tuple[Path, ...]) -> list[Target]:
        """The translatable targets among ``items`` (read from ``path``); the rest is reported."""
        out: list[Target] = []
        for item in items:
            where, value = self.loc(path, item.line), item.value
            if isinstance(value, Pipe):
                self.report(where, f"{show(item.raw)} {_PIPE}")
            elif isinstance(value, Include):
                out += self.include(item.raw, value.path, where, path.parent, stack)
            elif isinstance(value, File) and value.path == "/dev/null":
                out.append(Target(item.raw, where, "", local=False, special=Discard(), null=True))
            elif isinstance(value, File):
                self.report(where, f"{show(item.raw)} {_FILE}")
            elif isinstance(value, Refusal | Discard):
                out.append(Target(item.raw, where, "", local=False, special=value))
            elif isinstance(value, Malformed):
                self.report(where, f"{show(item.raw)} not understood ({value.reason}); left out")
            else:
                target = self.target(item.raw, value, where)
                if target:
                    out.append(target)
        return out

    def target(self, raw: str, item: Address | Backslashed, where: Loc) -> Target | None:
        noexpand = isinstance(item, Backslashed)
        value = item.name if isinstance(item, Backslashed) else item.value
        if "\ufffd" in value:
            self.report(where, f"{show(raw)} is not valid UTF-8; left out")
            return None
        if "@" in value:
            local, _, domain = value.rpartition("@")
            domain = domain.lower().rstrip(".")
            if not local or not DOMAIN.match(domain):
                self.report(where, f"{show(raw)} is not an address; left out")
                return None
            if domain not in ("localhost", self.domain):
                return Target(raw, where, f"{local}@{domain}", local=False)
            value = local  # our own domain: the same as the bare local name
        return Target(raw, where, value.lower(), local=True, noexpand=noexpand)

    def include(self, raw: str, spec: str, where: Loc, base: Path, stack: tuple[Path, ...]) -> list[Target]:
        if not spec:
            self.report(where, f"{show(raw)} names no file; left out")
            return []
        path = Path(os.path.normpath(base / spec))
        key = path.resolve()
        if key in stack or len(stack) > _MAX_INCLUDE_DEPTH:
            self.report(where, f"{show(raw)} includes itself (or nests too deep); left out")
            return []
        try:
            text = self.read(path)
        except FileNotFoundError:
            self.report(where, f"{show(raw)} include file not found; the other targets are kept")
            return []
        except OSError as exc:
            self.report(where, f"{show(raw)} include file cannot be read ({exc.strerror or exc}); "
                               "the other targets are kept")
            return []
        return self.expand(parse_list(text), path, (*stack, key))

    # -- files --------------------------------------------------------------------------

    def parse_aliases(self, path: Path) -> None:
        text = self.read(path)
        self.sources.append(f"aliases        {path}")
        for entry in parse_aliases(text):
            if isinstance(entry, AliasEntry):
                self.alias_entry(path, entry)
            elif entry.reason.startswith("continuation"):
                self.report(self.loc(path, entry.line), f"{entry.reason}; ignored")
            else:
                self.report(self.loc(path, entry.line), f"not understood ({entry.reason}): {show(entry.text)}")

    def alias_entry(self, path: Path, entry: AliasEntry) -> None:
        where = self.loc(path, entry.line)
        if "@" in entry.name:
            self.report(where, f"alias {show(entry.name)} is not a local name (virtual aliases belong in "
                               "a virtusertable); left out")
            return
        key = entry.name.lower()
        if key in self.aliases:
            self.report(where, f"alias {show(key)} defined again (first at line "
                               f"{self.aliases[key].where.line}); this definition left out")
            return
        targets = self.expand(entry.items, path, (path.resolve(),))
        self.aliases[key] = Alias(where, self.answering(key, targets))

    def answering(self, name: str, targets: list[Target]) -> list[Target]:
        """An alias's targets, with a special item standing alone (as Exim reads it)."""
        specials = [t for t in targets if t.special is not None and not t.null]
        if specials:
            for t in targets:
                if t is not specials[0]:
                    self.report(t.where, f"{show(t.raw)} left out: {show(specials[0].raw)} answers for all "
                                         f"of {name}, as Exim reads it")
            return specials[:1]
        if targets and all(t.null for t in targets):
            return targets[:1]  # only /dev/null: discards, which is :blackhole:
        return [t for t in targets if not t.null]

    def parse_virtusertable(self, path: Path) -> None:
        text = self.read(path)
        self.sources.append(f"virtusertable  {path}")
        entries: list[tuple[Loc, str, str, str]] = []  # (where, key, domain, target)
        for n, line in enumerate(text.split("\n"), 1):
            line = strip_comment(line).strip()
            if not line:
                continue
            where = self.loc(path, n)
            parts = line.split(None, 1)
            local, at, domain = parts[0].rpartition("@")
            domain = domain.lower().rstrip(".")
            if len(parts) < 2 or not at or not DOMAIN.match(domain):
                self.report(where, f"not understood (expected \"user@domain target\" or \"@domain target\"): "
                                   f"{show(line)}")
                continue
            if domain != self.domain:
                self.virtual_where.setdefault(domain, where)
            entries.append((where, local.lower() or "*", domain, parts[1].strip()))
        seen: dict[tuple[str, str], Loc] = {}
        for where, key, domain, target in entries:
            shown = f"{show(key + '@' + domain if key != '*' else '@' + domain)} -> {show(target)}"
            items = parse_list(target, where.line)
            special = bool(items) and isinstance(items[0].value, Refusal | Discard)
            if "*" in key and key != "*":
                self.report(where, f"{shown} (+detail key) not translated")
            elif _SUBSTITUTION.search(target):
                self.report(where, f"{shown} (%n substitution) not translated")
            elif not special and any(c.isspace() for c in target):
                self.report(where, f"{shown}: a target with spaces is not understood; left out")
            elif (key, domain) in seen:
                self.report(where, f"{shown}: {key}@{domain} defined again (first at line "
                                   f"{seen[key, domain].line}); this line left out")
            elif domain == self.domain and key == "*":
                self.report(where, f"{shown}: a catch-all for the local domain not translated "
                                   "(monomail refuses unknown local names)")
            else:
                seen[key, domain] = where
                translated = self.expand(items[:1], path, ())
                if not translated:
                    continue
                if domain != self.domain:
                    self.virtual.setdefault(domain, {})[key] = translated[0]
                elif not (translated[0].local and translated[0].value == key):  # not x@ours -> x
                    # Monomail's local domain has no virtual table: the entry becomes an alias,
                    # which wins over /etc/aliases as the virtusertable does in sendmail.
                    if key in self.aliases:
                        self.report(where, f"{shown} replaces the alias {show(key)} of "
                                           f"{self.aliases[key].where} (sendmail reads the virtusertable first)")
                    self.aliases[key] = Alias(where, translated)

    def parse_forward(self, user: str, path: Path) -> None:
        text = self.read(path)
        self.sources.append(f".forward       {user}: {path}")
        where = self.loc(path)
        name = user.lower()
        if not USER_NAME.match(name):
            self.report(where, f"user {show(user)} is not a valid user name (letters, digits, "
                               "'.', '_', '-'); this .forward left out")
            return
        if name in self.forwards:
            self.report(where, f"a second .forward for {name}; left out")
            return
        targets: list[Target] = []
        for t in self.expand(parse_list(text), path, (path.resolve(),)):
            if t.special is not None:
                self.report(t.where, f"{show(t.raw)} not translated (a monomail forward delivers; it cannot "
                                     "refuse or discard)")
            else:
                targets.append(t)
        keep = any(t.local and t.value == name for t in targets)
        self.forwards[name] = Forward(where, [t for t in targets if not (t.local and t.value == name)], keep)
