"""``monomail import``: turn sendmail/Postfix/Exim alias files into monomail.toml tables.

Job: read an /etc/aliases file, a sendmail virtusertable and users' .forward files, and
write the equivalent monomail.toml fragment (``[local]``, ``[users.NAME]``, ``[aliases]``,
``[virtual."domain"]``, ``[forward.NAME]``) as commented TOML in a stable order, plus a
report with one line, naming file and line, for everything that could not be translated.
A pure function of its input files: it reads them (and the ``:include:`` files they
name) and nothing else; it writes nothing, runs nothing and never looks at the system
(no passwd lookups: a login account is inferred from being the final target of an alias).

Formats read:

- aliases(5), as sendmail and Postfix read it: ``name: target, target``; a line that
  starts with whitespace continues the previous one; ``#`` starts a comment at the start
  of a line or after whitespace (not inside quotes); blank lines are ignored. Targets are
  comma-separated, may be quoted (``"..."``) and may be a local name, ``user@domain``,
  ``\\user`` (this login account, no further alias expansion), ``:include:/path`` (one
  or more addresses a line, comments allowed; a relative path is relative to the folder
  of the file naming it), ``|command`` or ``/path/file``.
- sendmail virtusertable, text form (the input of makemap): ``user@domain  target`` and
  ``@domain  target`` (catch-all), whitespace-separated, ``#`` comments. Each domain
  becomes a ``[virtual."domain"]`` table, except the primary domain, which monomail
  does not allow as a virtual domain: its entries become aliases, replacing an
  /etc/aliases entry of the same name (sendmail reads the virtusertable first).
- forward(5): addresses separated by commas or newlines, ``#`` comments; ``\\user``
  (the owner's own name) keeps a copy in the owner's mailbox.

Targets ``user@DOMAIN`` and ``user@localhost`` are written as the bare local name. A
local target ``name+tag`` becomes ``name+tag@DOMAIN``, which the router delivers to
``name`` when the recipient delimiter is ``+`` (the default).

Not translated, and reported instead (monomail has no such delivery from its tables):
pipes to programs, deliveries to files, virtusertable ``error:`` targets (monomail
refuses unknown addresses by itself), ``%1``-style substitutions, ``+*`` keys, a
catch-all for the primary domain, names that cannot be monomail user names, missing or
unreadable ``:include:`` files, lines that do not parse, duplicate definitions (the
first is kept), and aliases, virtual entries or forwards left with no target. A
``\\name`` target where ``name`` is also an alias is kept as ``name`` and reported:
monomail always expands an alias of that name.

Not here: installing the result (the admin merges it into monomail.toml and runs
``monomail check-config``), login accounts that no input file names, and the CLI wiring
(``cli`` calls `main`).

Error handling: `convert` raises `OSError` when one of the named input files cannot be
read (a missing ``:include:`` file is only reported); `main` prints that as one line
and exits 2.
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

# The same alphabet monomail.config holds user names to (they become path components).
_USER_NAME = re.compile(r"[a-z0-9_][a-z0-9._\-]*\Z")
_DOMAIN = re.compile(r"(?:[a-z0-9_\-\x80-\U0010ffff]+\.)*[a-z0-9_\-\x80-\U0010ffff]+\Z|\[[0-9a-f:.]+\]\Z")
_SUBSTITUTION = re.compile(r"%\d")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MAX_INCLUDE_DEPTH = 10
_PIPE = "(pipe to a program) not translated"
_FILE = "(delivery to a file) not translated"
_ERROR = "not translated (monomail refuses unknown addresses by itself)"


@dataclass(frozen=True, slots=True)
class ImportResult:
    toml: str  # the generated monomail.toml fragment (valid TOML, with comments)
    report: tuple[str, ...]  # one line per thing that could not be translated


@dataclass(frozen=True, slots=True, order=True)
class _Loc:
    """Where something was read: file and line (line 0: the file as a whole)."""

    seq: int  # order in which files were first read, so reports follow the input
    line: int
    file: str = field(compare=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True, slots=True)
class _Target:
    raw: str  # as written, for the report
    where: _Loc
    value: str  # a lower-case local name, or a full address local@domain
    local: bool  # value is a local name (a user or an alias)
    noexpand: bool = False  # written \name


@dataclass(slots=True)
class _Alias:
    where: _Loc
    targets: list[_Target]


@dataclass(slots=True)
class _Forward:
    where: _Loc
    targets: list[_Target]
    keep_copy: bool


@dataclass(frozen=True, slots=True)
class _Resolved:
    value: str  # what goes into the TOML list
    target: _Target
    via: str | None  # the alias name this value reaches first, if any


def _show(text: str) -> str:
    """Input text quoted for a report or comment line: one line, control characters escaped."""
    return '"' + _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) + '"'


def _strip_comment(line: str) -> str:
    """The line without a ``#`` comment (at the start, or after whitespace, outside quotes)."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _split_commas(text: str) -> list[tuple[str, int]]:
    """Comma-separated items outside quotes, stripped, each with the offset where it starts."""
    items: list[tuple[str, int]] = []

    def flush(start: int, end: int) -> None:
        item = text[start:end]
        if item.strip():
            items.append((item.strip(), start + len(item) - len(item.lstrip())))

    start, quoted, i = 0, False, 0
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            flush(start, i)
            start = i + 1
        i += 1
    flush(start, len(text))
    return items


def _words(item: str) -> list[tuple[str, str]]:
    """One comma-separated item as (as written, value) targets.

    ``"..."`` is unquoted; ``|command args`` and ``:include: path`` are one target each;
    ``Name <addr>`` gives ``addr``; otherwise whitespace separates targets.
    """
    if item.startswith("|") or item.lower().startswith(":include:"):
        return [(item, item)]
    item = _drop_comments(item)
    if "<" in item and item.endswith(">") and not item.startswith('"'):
        inner = item[item.rindex("<") + 1 : -1].strip()
        return [(item, inner)] if inner else []
    words: list[tuple[str, str]] = []
    for m in re.finditer(r'(?:"(?:[^"\\]|\\.)*"?|[^\s"]+)+', item):
        raw = m.group()
        value = raw
        if len(raw) >= 2 and raw.startswith('"') and raw.endswith('"'):
            value = raw = re.sub(r"\\(.)", r"\1", raw[1:-1]).strip()
        words.append((raw, value))
    return words


def _drop_comments(item: str) -> str:
    """``alice (Alice Smith)`` without its RFC 5322 comment (outside quotes)."""
    out, depth, quoted = [], 0, False
    for c in item:
        if c == '"' and not depth:
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
            continue
        elif not quoted and c == ")" and depth:
            depth -= 1
            continue
        if not depth:
            out.append(c)
    return "".join(out).strip()


def _toml_str(value: str) -> str:
    return tomli_w.dumps({"k": value})[len("k = ") : -1]


def _toml_key(key: str) -> str:
    return tomli_w.dumps({key: 0})[: -len(" = 0\n")]


def _toml_list(values: Sequence[str]) -> str:
    items = [_toml_str(v) for v in values]
    one = "[" + ", ".join(items) + "]"
    if len(one) <= 80:
        return one
    return "[\n" + "".join(f"    {item},\n" for item in items) + "]"


def _comment(text: str) -> str:
    return _CONTROL.sub("?", text)


class _Importer:
    """One conversion: the parsed input, what it became, and what was reported."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.files: dict[str, int] = {}
        self.reports: list[tuple[_Loc, int, str]] = []
        self.aliases: dict[str, _Alias] = {}
        self.virtual: dict[str, dict[str, _Target]] = {}
        self.virtual_where: dict[str, _Loc] = {}
        self.forwards: dict[str, _Forward] = {}
        self.sources: list[str] = []

    # -- reading ------------------------------------------------------------------------

    def loc(self, path: Path | str, line: int = 0) -> _Loc:
        name = str(path)
        return _Loc(self.files.setdefault(name, len(self.files)), line, name)

    def report(self, where: _Loc, text: str) -> None:
        self.reports.append((where, len(self.reports), f"{where}: {text}"))

    def read(self, path: Path) -> list[str]:
        self.loc(path)  # number the file in reading order
        text = path.read_text(encoding="utf-8", errors="replace")
        return text.replace("\r\n", "\n").split("\n")

    def expand(self, item: str, where: _Loc, base: Path, stack: tuple[Path, ...]) -> list[_Target]:
        """The translatable targets of one comma-separated item; the rest is reported."""
        out: list[_Target] = []
        for raw, value in _words(item):
            low = value.lower()
            if value.startswith("|"):
                self.report(where, f"{_show(raw)} {_PIPE}")
            elif low.startswith(":include:"):
                out += self.include(raw, value[len(":include:") :].strip(), where, base, stack)
            elif value.startswith("/"):
                self.report(where, f"{_show(raw)} {_FILE}")
            elif low.startswith("error:"):
                self.report(where, f"{_show(raw)} {_ERROR}")
            elif value:
                target = self.target(raw, value, where)
                if target:
                    out.append(target)
        return out

    def target(self, raw: str, value: str, where: _Loc) -> _Target | None:
        noexpand = value.startswith("\\")
        if noexpand:
            value = value[1:]
        if "\ufffd" in value:
            self.report(where, f"{_show(raw)} is not valid UTF-8; left out")
            return None
        if "@" in value:
            local, _, domain = value.rpartition("@")
            domain = domain.lower().rstrip(".")
            if not local or not _DOMAIN.match(domain):
                self.report(where, f"{_show(raw)} is not an address; left out")
                return None
            if domain not in ("localhost", self.domain):
                return _Target(raw, where, f"{local}@{domain}", local=False)
            value = local  # our own domain: the same as the bare local name
        return _Target(raw, where, value.lower(), local=True, noexpand=noexpand)

    def include(self, raw: str, spec: str, where: _Loc, base: Path, stack: tuple[Path, ...]) -> list[_Target]:
        if not spec:
            self.report(where, f"{_show(raw)} names no file; left out")
            return []
        path = Path(os.path.normpath(base / spec))
        key = path.resolve()
        if key in stack or len(stack) > _MAX_INCLUDE_DEPTH:
            self.report(where, f"{_show(raw)} includes itself (or nests too deep); left out")
            return []
        try:
            lines = self.read(path)
        except FileNotFoundError:
            self.report(where, f"{_show(raw)} include file not found; the other targets are kept")
            return []
        except OSError as exc:
            self.report(where, f"{_show(raw)} include file cannot be read ({exc.strerror or exc}); "
                               "the other targets are kept")
            return []
        out: list[_Target] = []
        for n, line in enumerate(lines, 1):
            for item, _ in _split_commas(_strip_comment(line)):
                out += self.expand(item, self.loc(path, n), path.parent, (*stack, key))
        return out

    def parse_aliases(self, path: Path) -> None:
        lines = self.read(path)
        self.sources.append(f"aliases        {path}")
        logical: list[list[tuple[int, str]]] = []
        for n, line in enumerate(lines, 1):
            text = _strip_comment(line)
            if not text.strip():
                continue
            if line[0] in " \t":
                if logical:
                    logical[-1].append((n, text))
                else:
                    self.report(self.loc(path, n), "continuation line with no alias before it; ignored")
            else:
                logical.append([(n, text)])
        for entry in logical:
            self.alias_entry(path, entry)

    def alias_entry(self, path: Path, entry: list[tuple[int, str]]) -> None:
        first, text = entry[0]
        where = self.loc(path, first)
        name, colon, rest = text.partition(":")
        name = name.strip()
        if not colon or not name or any(c.isspace() or c in "\"\\" for c in name):
            self.report(where, f"not understood (expected \"name: target, ...\"): {_show(text.strip())}")
            return
        if "@" in name:
            self.report(where, f"alias {_show(name)} is not a local name (virtual aliases belong in "
                               "a virtusertable); left out")
            return
        key = name.lower()
        if key in self.aliases:
            self.report(where, f"alias {_show(key)} defined again (first at line "
                               f"{self.aliases[key].where.line}); this definition left out")
            return
        value, starts, lines = "", [], []
        for n, segment in [(first, rest), *entry[1:]]:
            starts.append(len(value))
            lines.append(n)
            value += segment + "\n"
        targets: list[_Target] = []
        for item, offset in _split_commas(value):
            line = lines[bisect.bisect_right(starts, offset) - 1]
            targets += self.expand(item, self.loc(path, line), path.parent, (path.resolve(),))
        self.aliases[key] = _Alias(where, targets)

    def parse_virtusertable(self, path: Path) -> None:
        lines = self.read(path)
        self.sources.append(f"virtusertable  {path}")
        entries: list[tuple[_Loc, str, str, str]] = []  # (where, key, domain, target)
        for n, line in enumerate(lines, 1):
            text = _strip_comment(line).strip()
            if not text:
                continue
            where = self.loc(path, n)
            parts = text.split(None, 1)
            local, at, domain = parts[0].rpartition("@")
            domain = domain.lower().rstrip(".")
            if len(parts) < 2 or not at or not _DOMAIN.match(domain):
                self.report(where, f"not understood (expected \"user@domain target\" or \"@domain target\"): "
                                   f"{_show(text)}")
                continue
            if domain != self.domain:
                self.virtual_where.setdefault(domain, where)
            entries.append((where, local.lower() or "*", domain, parts[1].strip()))
        catch_alls = {d for _, k, d, t in entries
                      if k == "*" and d != self.domain and not t.lower().startswith("error:")}
        seen: dict[tuple[str, str], _Loc] = {}
        for where, key, domain, target in entries:
            shown = f"{_show(key + '@' + domain if key != '*' else '@' + domain)} -> {_show(target)}"
            if target.lower().startswith("error:"):
                note = f"; mail for {key}@{domain} will reach the catch-all of {domain}" \
                    if key != "*" and domain in catch_alls else ""
                self.report(where, f"{shown} {_ERROR}{note}")
            elif "*" in key and key != "*":
                self.report(where, f"{shown} (+detail key) not translated")
            elif _SUBSTITUTION.search(target):
                self.report(where, f"{shown} (%n substitution) not translated")
            elif any(c.isspace() for c in target):
                self.report(where, f"{shown}: a target with spaces is not understood; left out")
            elif (key, domain) in seen:
                self.report(where, f"{shown}: {key}@{domain} defined again (first at line "
                                   f"{seen[key, domain].line}); this line left out")
            elif domain == self.domain and key == "*":
                self.report(where, f"{shown}: a catch-all for the local domain not translated "
                                   "(monomail refuses unknown local names)")
            else:
                seen[key, domain] = where
                translated = self.expand(target, where, path.parent, ())[:1]
                if not translated:
                    continue
                if domain != self.domain:
                    self.virtual.setdefault(domain, {})[key] = translated[0]
                elif not (translated[0].local and translated[0].value == key):  # not x@ours -> x
                    # Monomail's local domain has no virtual table: the entry becomes an alias,
                    # which wins over /etc/aliases as the virtusertable does in sendmail.
                    if key in self.aliases:
                        self.report(where, f"{shown} replaces the alias {_show(key)} of "
                                           f"{self.aliases[key].where} (sendmail reads the virtusertable first)")
                    self.aliases[key] = _Alias(where, translated)

    def parse_forward(self, user: str, path: Path) -> None:
        lines = self.read(path)
        self.sources.append(f".forward       {user}: {path}")
        where = self.loc(path)
        name = user.lower()
        if not _USER_NAME.match(name):
            self.report(where, f"user {_show(user)} is not a valid user name (letters, digits, "
                               "'.', '_', '-'); this .forward left out")
            return
        if name in self.forwards:
            self.report(where, f"a second .forward for {name}; left out")
            return
        targets: list[_Target] = []
        for n, line in enumerate(lines, 1):
            for item, _ in _split_commas(_strip_comment(line)):
                targets += self.expand(item, self.loc(path, n), path.parent, (path.resolve(),))
        keep = any(t.local and t.value == name for t in targets)
        self.forwards[name] = _Forward(where, [t for t in targets if not (t.local and t.value == name)], keep)

    # -- translating --------------------------------------------------------------------

    def build(self) -> ImportResult:
        users: dict[str, _Loc] = {}

        def add_user(name: str, t: _Target) -> bool:
            if _USER_NAME.match(name):
                users.setdefault(name, t.where)
                return True
            return False

        def resolve(t: _Target, owner: str | None = None) -> _Resolved | None:
            if not t.local:
                return _Resolved(t.value, t, None)
            name = t.value
            if name in self.aliases and name != owner:
                if t.noexpand:
                    self.report(t.where, f"{_show(t.raw)}: {name} is also an alias, which monomail expands "
                                         f"(sendmail delivers to the mailbox of user {name})")
                return _Resolved(name, t, name)
            if add_user(name, t):  # a login account; or alice: \alice, ...: the account alice
                return _Resolved(name, t, None)
            base, plus, _ = name.partition("+")
            if name != owner and plus and (base in self.aliases or add_user(base, t)):
                return _Resolved(f"{name}@{self.domain}", t, base if base in self.aliases else None)
            self.report(t.where, f"{_show(t.raw)} is not a valid user name (letters, digits, '.', '_', '-'); "
                                 "left out")
            return None

        for name in sorted(self.forwards, key=lambda n: self.forwards[n].where):
            users.setdefault(name, self.forwards[name].where)
        aliases = {
            name: [r for t in a.targets if (r := resolve(t, name))]
            for name, a in sorted(self.aliases.items(), key=lambda kv: kv[1].where)
        }
        virtual = {
            domain: {key: r for key, t in entries.items() if (r := resolve(t))}
            for domain, entries in self.virtual.items()
        }
        forwards = {name: [r for t in f.targets if (r := resolve(t))] for name, f in self.forwards.items()}

        # An alias with nothing left is left out, and so is every target that led only to it.
        while empty := [name for name, targets in aliases.items() if not targets]:
            gone = set()
            for name in empty:
                self.report(self.aliases[name].where, f"alias {_show(name)} has no translatable targets; left out")
                del aliases[name]
                if name not in users:
                    gone.add(name)

            def keep(r: _Resolved, gone: set[str] = gone) -> bool:
                if r.via in gone:
                    self.report(r.target.where, f"{_show(r.target.raw)} left out with the alias {r.via}")
                    return False
                return True

            for name in aliases:
                aliases[name] = [r for r in aliases[name] if keep(r)]
            for entries in virtual.values():
                for key in [k for k, r in entries.items() if not keep(r)]:
                    del entries[key]
            for name in forwards:
                forwards[name] = [r for r in forwards[name] if keep(r)]

        for domain in sorted(set(self.virtual_where) - {d for d, e in virtual.items() if e}):
            self.report(self.virtual_where[domain], f"virtual domain {domain} has no translated entries; "
                                                    "it is not declared")
        for name, f in self.forwards.items():
            if not forwards[name] and not f.keep_copy:
                self.report(f.where, f".forward of {name} has no translatable targets; left out")

        report = tuple(text for _, _, text in sorted(self.reports))
        return ImportResult(self.render(users, aliases, virtual, forwards, report), report)

    def render(
        self,
        users: dict[str, _Loc],
        aliases: dict[str, list[_Resolved]],
        virtual: dict[str, dict[str, _Resolved]],
        forwards: dict[str, list[_Resolved]],
        report: tuple[str, ...],
    ) -> str:
        def values(rs: list[_Resolved]) -> str:
            return _toml_list(list(dict.fromkeys(r.value for r in rs)))

        out = ["# monomail.toml fragment generated by `monomail import` from:"]
        out += [f"#   {_comment(s)}" for s in self.sources] or ["#   (no input files)"]
        out += [
            "# Merge it into monomail.toml and run `monomail check-config`. Login accounts that",
            "# receive mail but are named in none of these files need a [users.NAME] table too.",
        ]
        if report:
            out.append(f"# {len(report)} item(s) could not be translated; they are listed at the end.")
        out += ["", "[local]", f"domains = {_toml_list([self.domain])}"]
        if users:
            out += ["", "# Login accounts (the final targets of aliases, and .forward owners)."]
            out += [f"[users.{_toml_key(n)}]  # {_comment(str(users[n]))}" for n in sorted(users)]
        if aliases:
            out += ["", "[aliases]"]
            out += [f"{_toml_key(n)} = {values(aliases[n])}  # {_comment(str(self.aliases[n].where))}"
                    for n in sorted(aliases)]
        for domain in sorted(d for d in virtual if virtual[d]):
            out += ["", f"[virtual.{_toml_key(domain)}]"]
            out += [f"{_toml_key(k)} = {values([r])}  # {_comment(str(r.target.where))}"
                    for k, r in sorted(virtual[domain].items())]
        for name in sorted(forwards):
            if forwards[name]:
                out += ["", f"[forward.{_toml_key(name)}]  # {_comment(str(self.forwards[name].where))}",
                        f"to = {values(forwards[name])}",
                        f"keep_copy = {'true' if self.forwards[name].keep_copy else 'false'}"]
        if report:
            out += ["", "# Not translated:"] + [f"#   {_comment(line)}" for line in report]
        return "\n".join(out) + "\n"


def convert(
    *,
    aliases: Path | None = None,
    virtusertable: Path | None = None,
    forwards: Sequence[tuple[str, Path]] = (),
    domain: str = "localhost",
) -> ImportResult:
    """Translate the given files into a monomail.toml fragment and a report.

    ``domain`` is the primary local domain (``[local] domains``); targets in it or in
    ``localhost`` count as local names. Raises `OSError` if a named file cannot be read,
    `ValueError` if ``domain`` is not a domain name.
    """
    domain = domain.strip().rstrip(".").lower()
    if not _DOMAIN.match(domain):
        raise ValueError(f"not a domain name: {domain!r}")
    imp = _Importer(domain)
    if aliases is not None:
        imp.parse_aliases(Path(aliases))
    if virtusertable is not None:
        imp.parse_virtusertable(Path(virtusertable))
    for user, path in forwards:
        imp.parse_forward(user, Path(path))
    return imp.build()


def _forward_arg(text: str) -> tuple[str, Path]:
    user, eq, path = text.partition("=")
    if not eq or not user or not path:
        raise argparse.ArgumentTypeError(f"expected USER=FILE, got {text!r}")
    return user, Path(path)


def _domain_arg(text: str) -> str:
    domain = text.strip().rstrip(".").lower()
    if not _DOMAIN.match(domain):
        raise argparse.ArgumentTypeError(f"not a domain name: {text!r}")
    return domain


def main(argv: Sequence[str]) -> int:
    """``monomail import``: the TOML on stdout, the report on stderr; exit 0, or 2 on a bad file."""
    parser = argparse.ArgumentParser(
        prog="monomail import",
        description="Translate /etc/aliases, a sendmail virtusertable and .forward files into "
                    "monomail.toml tables (printed on stdout; what could not be translated goes to stderr).",
    )
    parser.add_argument("--aliases", type=Path, metavar="FILE", help="an aliases(5) file such as /etc/aliases")
    parser.add_argument("--virtusertable", type=Path, metavar="FILE", help="a sendmail virtusertable (text form)")
    parser.add_argument("--forward", type=_forward_arg, action="append", default=[], metavar="USER=FILE",
                        help="a user's .forward file (repeatable)")
    parser.add_argument("--domain", type=_domain_arg, default="localhost",
                        help="the primary local domain (default: localhost)")
    args = parser.parse_args(list(argv))
    if args.aliases is None and args.virtusertable is None and not args.forward:
        parser.error("nothing to import: give --aliases, --virtusertable or --forward")
    try:
        result = convert(aliases=args.aliases, virtusertable=args.virtusertable,
                         forwards=args.forward, domain=args.domain)
    except OSError as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
        print(f"monomail import: {exc.filename or 'input file'}: {reason}", file=sys.stderr)
        return 2
    sys.stdout.write(result.toml)
    for line in result.report:
        print(f"monomail import: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
