"""The one address-list lexer: aliases(5), forward(5) and ``:include:`` files, item by item.

Job: split a list of addresses the way sendmail, Postfix and Exim read /etc/aliases and
``~/.forward``, into typed items, each with the line it came from. Pure: text in, items
out. It opens no file (an `Include` names one; the caller decides), looks nothing up and
knows no config. ``config`` (special alias targets), ``tables`` (``.forward`` files at
delivery time) and ``importer`` (/etc/aliases, include files, ``.forward`` files,
virtusertable targets) all read lists here, so the three agree.

A list (`parse_list`):

- items are separated by commas or newlines; spaces and tabs around them are ignored;
- ``#`` at the start of an item, or after whitespace outside quotes, starts a comment
  that runs to the end of the line (``x#y@example.net`` is an address);
- ``"..."`` quotes, with ``\\"`` and ``\\\\`` escapes: a comma or ``#`` inside neither
  separates nor comments; quotes around a whole item are removed (``"|cmd a, b"`` is one
  pipe); a quote or a comment does not run past the end of its line;
- ``(...)`` is an RFC 5322 comment and is dropped; ``Name <addr>`` gives ``addr``;
- without angle brackets, whitespace separates addresses too (sendmail's old-style
  lists): ``alice bob`` is two items;
- ``\\user`` is `Backslashed` (in an alias: that login account, no alias expansion; in
  a ``.forward``: keep a copy in one's own mailbox); ``|command`` is a `Pipe`, ``/path``
  a `File`, ``:include:/path`` an `Include`; an unquoted pipe or include runs to the
  next comma, spaces included;
- special items answer instead of delivering, as Exim's redirect router reads them:
  ``:fail: [code] [x.y.z] text`` and ``:defer: [code] [x.y.z] text`` are a `Refusal`,
  ``:blackhole:`` is a `Discard`. sendmail's ``error:x.y.z:code text`` and
  ``error:nouser text`` (and ``:error: x.y.z text``) are refusals too, permanent or
  temporary as their status says. An unquoted refusal's text runs to the end of its
  line, commas included (``:fail: Gone away, no forwarding address``), less a ``#``
  comment. `parse_special` reads one such item, as monomail.toml holds it;
- an item that does not parse is `Malformed`, with the reason: never a list of names.

An aliases(5) file (`parse_aliases`): ``name: list``; a line that starts with a space or
a tab continues the entry before it; blank lines and ``#`` comment lines are skipped.

Refusal text goes into an SMTP reply (RFC 5321 §4.2): it is held to printable ASCII
(anything else becomes ``?``, a run of whitespace one space) and `MAX_TEXT` characters.
With ``strict=True`` (how monomail.toml is checked) such text is refused instead.

Not here: what an item means (a user, an alias, an address elsewhere: the router and
the importer decide), reading ``:include:`` files, checking domains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .settings import Discard, Refusal

MAX_TEXT = 200  # characters of refusal text; an SMTP reply line holds 512 in all

DEFAULT_FAIL = Refusal(550, "5.1.1", "User unknown")
DEFAULT_DEFER = Refusal(450, "4.2.1", "Try again later")

# sendmail's error mailer names sysexits(3) codes: error:nouser, error:tempfail, ...
_SYSEXITS = {
    "nouser": (550, "5.1.1"),
    "nohost": (550, "5.1.2"),
    "unavailable": (550, "5.0.0"),
    "noperm": (550, "5.7.1"),
    "tempfail": (450, "4.0.0"),
}
_SPECIAL = re.compile(r":(?:fail|defer|blackhole|error):|error:", re.IGNORECASE)
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s*:\s*|\s+|\Z)")
_CODE = re.compile(r"([245])\d\d(?:\s*:\s*|\s+|\Z)")
_SYSEXIT = re.compile(r"([a-z]+)(?:\s+|\Z)", re.IGNORECASE)
_WORD = re.compile(r'(?:"(?:[^"\\\n]|\\.)*"|[^\s"]+)+')


@dataclass(frozen=True, slots=True)
class Address:
    """An address ``local@domain`` or a bare local name, as written."""

    value: str


@dataclass(frozen=True, slots=True)
class Backslashed:
    """``\\name``: the login account itself, no alias expansion (a copy kept, in a .forward)."""

    name: str


@dataclass(frozen=True, slots=True)
class Pipe:
    """``|command``: a program to feed the message to."""

    command: str


@dataclass(frozen=True, slots=True)
class File:
    """``/path``: a file to append the message to."""

    path: str


@dataclass(frozen=True, slots=True)
class Include:
    """``:include:path``: more addresses, one file's worth (a relative path is the caller's)."""

    path: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """An item that does not parse, and why."""

    reason: str


Kind = Address | Backslashed | Pipe | File | Include | Refusal | Discard | Malformed


@dataclass(frozen=True, slots=True)
class Item:
    value: Kind
    raw: str  # as written (less quotes around the whole item), for reports and log lines
    line: int  # the line it is on, counted from ``first_line``


@dataclass(frozen=True, slots=True)
class AliasEntry:
    """``name: list`` of an aliases file, with its continuation lines."""

    name: str  # as written
    line: int
    items: tuple[Item, ...]


@dataclass(frozen=True, slots=True)
class BadLine:
    """An aliases file line that is not ``name: list``."""

    line: int
    text: str  # without its comment
    reason: str


# -- refusals ---------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """``text`` fit for an SMTP reply: printable ASCII, one space between words, cut short."""
    text = "".join(c if " " <= c <= "~" else "?" for c in " ".join(text.split()))
    return text[:MAX_TEXT].rstrip()


def parse_special(text: str, *, strict: bool = False) -> Refusal | Discard | None:
    """The `Refusal` or `Discard` ``text`` stands for, or None if it is not a special item.

    Raises `ValueError` with the reason for a special item that does not make sense (a
    ``:fail:`` with a 4.x.x status, a code and a status of different classes) and, when
    ``strict``, for text that is not printable ASCII or is over `MAX_TEXT` characters.
    """
    text = text.strip()
    m = _SPECIAL.match(text)
    if not m:
        return None
    word, rest = m.group().lower(), text[m.end() :].strip()
    if word == ":blackhole:":
        if rest and strict:
            raise ValueError(":blackhole: takes no text")
        return Discard()
    code = status = None
    while rest:
        if status is None and (s := _STATUS.match(rest)):
            status = ".".join(s.groups())
            rest = rest[s.end() :]
        elif code is None and (c := _CODE.match(rest)):
            code = int(c.group()[:3])
            rest = rest[c.end() :]
        else:
            break
    x = _SYSEXIT.match(rest) if word == "error:" and code is None and status is None else None
    if x and x.group(1).lower() in _SYSEXITS:
        code, status = _SYSEXITS[x.group(1).lower()]
        rest = rest[x.end() :]
    classes = {str(code)[0] if code else None, status[0] if status else None} - {None}
    if "2" in classes:
        raise ValueError(f"a refusal needs a 4xx or 5xx reply, not {code or status}")
    if len(classes) > 1:
        raise ValueError(f"reply code {code} and status {status} do not agree (both 4 or both 5)")
    temporary = classes == {"4"} or (not classes and word == ":defer:")
    if word == ":fail:" and temporary:
        raise ValueError(":fail: refuses for good: its status is 5.x.x (:defer: is for 4.x.x)")
    if word == ":defer:" and not temporary:
        raise ValueError(":defer: asks to try later: its status is 4.x.x (:fail: is for 5.x.x)")
    default = DEFAULT_DEFER if temporary else DEFAULT_FAIL
    clean = clean_text(rest)
    if strict and clean != " ".join(rest.split()):
        raise ValueError(f"the text must be printable ASCII, at most {MAX_TEXT} characters")
    return Refusal(code or default.code, status or default.status, clean or default.text)


def format_special(value: Refusal | Discard) -> str:
    """The monomail.toml spelling of ``value``, which `parse_special` reads back the same."""
    if isinstance(value, Discard):
        return ":blackhole:"
    default = DEFAULT_DEFER if value.temporary else DEFAULT_FAIL
    code = "" if value.code == default.code else f"{value.code} "
    return f"{':defer:' if value.temporary else ':fail:'} {code}{value.status} {value.text}"


# -- lists ------------------------------------------------------------------------------


def parse_list(text: str, first_line: int = 1) -> list[Item]:
    """The items of a list of addresses (a .forward file, an include file, an alias's value)."""
    items: list[Item] = []
    i, n, line = 0, len(text), first_line
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in ", \t\r\f\v":
            i += 1
        elif c == "#":
            i = _line_end(text, i)
        elif _SPECIAL.match(text, i):  # runs to the end of the line, commas included
            end = _line_end(text, i)
            raw = strip_comment(text[i:end]).strip()
            items.append(_special_item(raw, raw, line))
            i = end
        else:
            end, problem = _item_end(text, i)
            raw = text[i:end].strip()
            items += [Item(Malformed(problem), raw, line)] if problem else _classify(raw, line)
            i = end
    return items


def parse_aliases(text: str) -> list[AliasEntry | BadLine]:
    """The entries of an aliases(5) file, in order, and the lines that are not entries."""
    out: list[AliasEntry | BadLine] = []
    groups: list[list[tuple[int, str]]] = []
    for n, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not strip_comment(line).strip():
            continue
        if line[0] in " \t":
            if groups:
                groups[-1].append((n, line))
            else:
                out.append(BadLine(n, strip_comment(line).strip(), "continuation line with no alias before it"))
        else:
            groups.append([(n, line)])
    for group in groups:
        first, line = group[0]
        name, colon, rest = line.partition(":")
        name = name.strip()
        if not colon or not name or any(c.isspace() or c in "\"\\#" for c in name):
            out.append(BadLine(first, strip_comment(line).strip(), 'expected "name: target, ..."'))
            continue
        value, at = rest, first
        for n, more in group[1:]:
            value += "\n" * (n - at) + more
            at = n
        out.append(AliasEntry(name, first, tuple(parse_list(value, first))))
    out.sort(key=lambda e: e.line)
    return out


def strip_comment(line: str) -> str:
    """``line`` without its ``#`` comment (at the start, or after whitespace, outside quotes)."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _line_end(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _item_end(text: str, i: int) -> tuple[int, str]:
    """Where the item starting at ``i`` ends (a comma, a comment, the line's end), and a
    problem if a quote or a comment is left open there."""
    quoted, depth, j, n = False, 0, i, len(text)
    parens = text[i] != "|"  # a command's parentheses are its own
    while j < n and text[j] != "\n":
        ch = text[j]
        if (quoted or depth) and ch == "\\" and j + 1 < n and text[j + 1] != "\n":
            j += 2
            continue
        if quoted:
            quoted = ch != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(ch, 0)
        elif ch == '"':
            quoted = True
        elif ch == "(" and parens:
            depth = 1
        elif ch == "," or (ch == "#" and text[j - 1].isspace()):
            break
        j += 1
    return j, "a quote is not closed" if quoted else "a comment ( ) is not closed" if depth else ""


def _unquote_whole(raw: str) -> str | None:
    """The inside of ``raw`` if one quoted string is all of it, else None."""
    if not raw.startswith('"'):
        return None
    m = re.match(r'"((?:[^"\\]|\\.)*)"', raw, re.DOTALL)
    if not m or m.end() != len(raw):
        return None
    return re.sub(r"\\(.)", r"\1", m.group(1)).strip()


def _drop_comments(item: str) -> str:
    """``alice (Alice Smith)`` without its RFC 5322 comment (outside quotes)."""
    out, depth, quoted, escaped = [], 0, False, False
    for c in item:
        if escaped:
            escaped = False
        elif c == "\\" and (quoted or depth):
            escaped = True
        elif c == '"' and not depth:
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


def _classify(raw: str, line: int) -> list[Item]:
    if not raw:
        return []
    whole = _unquote_whole(raw)
    if whole is not None:
        return [_one(whole, whole, line)] if whole else []
    if raw.startswith("|") or raw[:9].lower() == ":include:":
        return [_one(raw, raw, line)]
    text = _drop_comments(raw)
    if not text:
        return []  # only a comment: "(nobody)"
    if "<" in text or ">" in text:
        inner = text[text.rfind("<") + 1 : -1].strip() if text.endswith(">") else ""
        if not inner or any(c in inner for c in "<> \t"):
            return [Item(Malformed("not an address in < >"), raw, line)]
        return [_one(inner, raw, line)]
    out = []
    for word in _WORD.findall(text):
        unquoted = _unquote_whole(word)
        out.append(_one(word, word, line) if unquoted is None else _one(unquoted, unquoted, line))
    return [item for item in out if item.raw]


def _one(value: str, raw: str, line: int) -> Item:
    if value.startswith("|"):
        return Item(Pipe(value[1:].strip()), raw, line)
    if value[:9].lower() == ":include:":
        return Item(Include(value[9:].strip()), raw, line)
    if _SPECIAL.match(value):
        return _special_item(value, raw, line)
    if value.startswith("\\"):
        name = value[1:]
        return Item(Backslashed(name) if name else Malformed("nothing after \\"), raw, line)
    if value.startswith("/"):
        return Item(File(value), raw, line)
    return Item(Address(value), raw, line)


def _special_item(value: str, raw: str, line: int) -> Item:
    try:
        special = parse_special(value)
    except ValueError as exc:
        return Item(Malformed(str(exc)), raw, line)
    return Item(special or Malformed("not a special item"), raw, line)
