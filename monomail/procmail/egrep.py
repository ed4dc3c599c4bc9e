"""procmail's egrep dialect, translated to Python ``re`` (bytes), and the search it runs.

Job: turn one condition's regular expression into a compiled Python pattern
(`compile_pattern`, cached) and search a message area with it (`search`), giving the
MATCH text of a ``\\/`` pattern. The translation follows procmail's regexp.c and
procmailrc(5) MISCELLANEOUS / procmailex(5): the macros ``^TO_`` ``^TO``
``^FROM_DAEMON`` ``^FROM_MAILER`` (exactly as procmail's config.h spells them;
``^FROM_DAEMON`` forces case-insensitive matching), ``^`` and ``$`` match a newline
(the area is searched with a newline added before and after it), ``.`` and
``[^...]`` never cross lines, ``^^`` anchors at the start or the end of the area,
``\\<`` and ``\\>`` match a non-word character, bracket expressions have no escapes
and no named classes, ``*`` ``+`` ``?`` after nothing are literal.

``\\/`` (MATCH): the part left of it is matched as short as possible, the right part
as long as possible (lazy quantifiers on the left); it must be outside parentheses
and may appear once. See difference 10 in the package docstring.

Not here: which area a condition searches (H, B, HB, ``VAR ??``), negation, ``$``
expansion of the pattern, case folding by the ``D`` flag (the caller passes
``nocase``); those are the engine's. This module imports nothing of ours.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Regex:
    """A translated pattern: search it in ``b"\\n" + area + b"\\n"`` (see `search`)."""

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
def compile_pattern(pattern: str, nocase: bool) -> Regex:
    """procmail's egrep dialect to a Python bytes regex, matched against the search
    area with a newline added before and after it; ValueError if invalid."""
    text, force = _macros(pattern)
    py, captures = _translate(text.encode("utf-8", "surrogateescape"), pattern)
    try:
        rx = re.compile(py, re.IGNORECASE if nocase or force else 0)
    except re.error as exc:  # pragma: no cover - _translate emits valid syntax
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    return Regex(rx, captures)


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



def search(rx: Regex, area: bytes) -> tuple[bool, str | None]:
    """Whether ``rx`` matches ``area`` (a newline is added before and after it), and
    the MATCH text when ``rx`` has a ``\\/`` (else None)."""
    padded = b"\n" + area + b"\n"
    m = rx.rx.search(padded)
    if m is None:
        return False, None
    if not rx.captures:
        return True, None
    start, end = m.span(1)
    if padded[start:start + 1] == b"\n":
        start += 1
    end = min(max(end, start), len(padded) - 1)
    return True, padded[start:end].decode("utf-8", "surrogateescape")
