"""The Authentication-Results header field: written for our checks, and forgeries of it
recognized (RFC 8601).

Job: `field` builds the one ``Authentication-Results: <authserv-id>; spf=...
smtp.mailfrom=...; dkim=... header.d=... header.s=... header.b=...; dmarc=...
header.from=...`` field of a message's checks, with authres (imported here and nowhere
else), folded one result a line; `claims` says whether a field that arrived names our
authserv-id (compared without regard to case, RFC 8601 §2.5), so that the caller
(``inbound``) removes it (§5: a field claiming to be ours that came from outside is a
forgery). Not here: the checks themselves (``spfcheck``, ``dkimsig``, ``dmarc``).

Security stance: the values put into the field come from the client (HELO, MAIL FROM)
or the message (a signature's d= and s=, the From domain). Only domain names and
base64 text are written, each checked against a strict pattern, and dropped otherwise;
comments and reasons are monomail's own words. So nothing a client sends can add a
result, a property or a field (authres leaves a value with ``@`` unquoted, which is why
no address is written: ``smtp.mailfrom`` is the domain, as RFC 8601 §2.7.2 allows).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import authres

_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,252})$")
_SELECTOR = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_B64 = re.compile(r"^[A-Za-z0-9+/=]{1,16}$")
_COMMENT = re.compile(r"^[A-Za-z0-9 =.:_-]{0,80}$")
_TOKEN = re.compile(r'[^\s;()"]+')


@dataclass(frozen=True, slots=True)
class Clause:
    """One result: ``method=result (comment) ptype.property=value ...``."""

    method: str  # "spf" | "dkim" | "dmarc"
    result: str
    properties: tuple[tuple[str, str, str], ...] = ()  # (ptype, property, value)
    comment: str = ""  # monomail's own text (e.g. "p=reject")


def spf_clause(result: str, identity: str, domain: str) -> Clause:
    prop = "helo" if identity == "helo" else "mailfrom"
    return Clause("spf", result, (("smtp", prop, domain),))


def dkim_clause(result: str, domain: str, selector: str, header_b: str) -> Clause:
    return Clause("dkim", result, (("header", "d", domain), ("header", "s", selector), ("header", "b", header_b)))


def dmarc_clause(result: str, from_domain: str, policy: str) -> Clause:
    return Clause("dmarc", result, (("header", "from", from_domain),), f"p={policy}" if policy else "")


def _safe(prop: str, value: str) -> bool:
    if prop == "b":
        return bool(_B64.match(value))
    if prop == "s":
        return bool(_SELECTOR.match(value))
    return bool(_DOMAIN.match(value)) and ".." not in value


def _result(clause: Clause) -> authres.AuthenticationResult:
    props = [authres.AuthenticationResultProperty(ptype, name, value)
             for ptype, name, value in clause.properties if value and _safe(name, value)]
    comment = clause.comment if _COMMENT.match(clause.comment) else ""
    return authres.AuthenticationResult(clause.method, result=clause.result, result_comment=comment or None,
                                        properties=props)


def field(authserv_id: str, clauses: Sequence[Clause]) -> bytes:
    """The whole field, LF-ended, one result a line (``none`` when there are none)."""
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=[_result(c) for c in clauses])
    if not clauses:
        return f"{header}\n".encode("ascii")
    lines = ";\n\t".join([header.authserv_id, *(str(r) for r in header.results)])
    return f"Authentication-Results: {lines}\n".encode("ascii")


def _skip_cfws(text: str) -> str:
    """``text`` without the white space and (nested) comments it begins with."""
    while True:
        text = text.lstrip()
        if not text.startswith("("):
            return text
        depth, i = 0, 0
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        text = text[i + 1:]


def authserv_id(value: str) -> str:
    """The authserv-id a field value names (lower case, "" when none can be found): by
    authres's parser, or, for a value it refuses, the first word after any comments."""
    unfolded = value.replace("\r", "").replace("\n", "")
    try:
        found = authres.AuthenticationResultsHeader.parse_value(unfolded).authserv_id or ""
    except Exception:  # authres refuses it: take the first token ourselves
        rest = _skip_cfws(unfolded)
        if rest.startswith('"'):
            found = rest[1:].partition('"')[0]
        else:
            m = _TOKEN.match(rest)
            found = m.group(0) if m else ""
    return str(found).strip().strip('"').rstrip(".").lower()


def claims(value: bytes, ours: str) -> bool:
    """Does this Authentication-Results value (after the colon) name ``ours``?"""
    return authserv_id(value.decode("utf-8", "replace")) == ours.rstrip(".").lower()
