"""SPF: may this client send mail for the envelope sender's domain? (RFC 7208)

Job: one SPF evaluation with pyspf (imported here and nowhere else): the MAIL FROM
domain, or for the null sender ``<>`` the HELO name (RFC 7208 §2.3, §2.4), against
the client's address; the result is one of RFC 7208 §2.6's ``pass``, ``fail``,
``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``. Not here: what the
result means for the message (``dmarc``, ``inbound``), the Authentication-Results field
(``authresults``).

DNS: every question pyspf asks goes to the ``lookup`` it is handed (``resolver.
BlockingLookup``: monomail's resolver and its ``[dns]`` settings). `_Query` subclasses
``spf.query`` and overrides its one DNS method, ``query.dns``; pyspf's module-level
``DNSLookup`` (its own dnspython resolver) is never called and nothing of pyspf's is
patched. pyspf's processing limits stay: 10 DNS-querying mechanisms (§4.6.4), 2 void
lookups, 10 MX and PTR names. The obsolete SPF RR type (99) is not asked for (§3.1).

Blocking: pyspf and the lookup block; callers run `check` in a worker thread.

Error handling: a DNS failure (`DestinationError`: SERVFAIL, timeout) is ``temperror``;
an exception nobody classified is ``temperror`` too (logged), never a rejection.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf

from .errors import DestinationError

log = logging.getLogger("monomail.spf")

Lookup = Callable[[str, str], list[Any]]  # (name, rdtype) → values, as `resolver.Resolver.records`
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class SPFResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo": which name was checked (RFC 8601 smtp.mailfrom / smtp.helo)
    domain: str  # the domain checked, in A-labels ("" when there was none to check)
    reason: str = ""  # pyspf's explanation, for the log


def domain_name(name: str) -> str:
    """``name`` as a lower-case A-label host name, or "" when it is not one (an address
    literal, an empty or malformed name)."""
    name = name.strip().rstrip(".")
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return ""
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return ""
    return name


class _Query(spf.query):
    """pyspf's query with its DNS questions asked through ``lookup``."""

    def __init__(self, lookup: Lookup, **kw: Any) -> None:
        self.monomail_lookup = lookup
        super().__init__(**kw)

    def dns(self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list[Any]:
        """The records of ``name``/``qtype`` in pyspf's shapes (TXT: a list of strings per
        record; MX: (preference, host); A, AAAA, PTR: text), cached for this query.
        Void answers count against RFC 7208 §4.6.4's limit of two. CNAMEs are followed by
        the resolver."""
        if not name:
            raise spf.PermError("empty domain name in a DNS query")
        name = str(name).rstrip(".").lower()
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # not a DNS name (as pyspf's own method answers)
        key = (name, qtype)
        if key in self.cache:
            result = self.cache[key]
        elif qtype == "SPF":  # RR type 99: obsolete (RFC 7208 §3.1), never asked
            result = []
        else:
            try:
                values = self.monomail_lookup(name, qtype)
            except DestinationError as exc:
                raise spf.TempError(f"DNS {exc.detail}") from exc
            result = [[v] for v in values] if qtype == "TXT" else list(values)
            self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return list(result)


def check(client_ip: str, sender: str, helo: str, lookup: Lookup) -> SPFResult:
    """The SPF result for ``client_ip`` sending as ``sender`` (MAIL FROM, "" for ``<>``)
    after ``helo``. Blocking: run it in a worker thread."""
    if sender:
        identity, domain = "mailfrom", domain_name(sender.rpartition("@")[2])
    else:
        identity, domain = "helo", domain_name(helo)
    if not domain:
        return SPFResult("none", identity, "", "no domain name to check")
    try:
        ip = str(ipaddress.ip_address(client_ip))
    except ValueError:
        return SPFResult("none", identity, domain, f"not an IP address: {client_ip!r}")
    local = sender.rpartition("@")[0] if sender else "postmaster"
    if not local or "@" in local or not local.isascii():  # only for %{l} macros: keep pyspf's split right
        local = "postmaster"
    try:
        if identity == "mailfrom":
            q = _Query(lookup, i=ip, s=f"{local}@{domain}", h=domain_name(helo) or helo)
        else:
            q = _Query(lookup, i=ip, s="", h=domain)
        result, _code, explanation = q.check()
    except Exception as exc:  # nobody classified it: temporary, never a rejection
        log.warning("SPF check of %s for [%s] failed: %r", domain, ip, exc, exc_info=exc)
        return SPFResult("temperror", identity, domain, f"{type(exc).__name__}: {exc}")
    result = str(result).lower()
    if result not in RESULTS:  # pyspf's older names
        result = {"error": "temperror", "unknown": "permerror", "deny": "fail"}.get(result, "permerror")
    return SPFResult(result, identity, domain, str(explanation))
