"""DMARC: does the From: domain's policy accept what SPF and DKIM found? (RFC 7489)

Job: for one RFC5322.From domain, find its DMARC policy record in the DNS (§6.6.3:
``_dmarc.<from domain>``, else ``_dmarc.<organizational domain>``, whose ``sp=`` then
applies), decide whether an SPF or DKIM pass is aligned with the From domain (§3.1:
relaxed, the same organizational domain; or strict, the same name, per ``aspf=`` /
``adkim=``) and answer ``pass``, ``fail``, ``none``, ``temperror`` or ``permerror`` with
the policy that applies (``none``, ``quarantine``, ``reject``). ``pct=`` and reporting
are not implemented. Not here: SPF (``spfcheck``), DKIM (``dkimsig``), what a failure
does to the message (``inbound``).

authheaders (imported here and nowhere else) gives the public suffix list, the copy in
its package (no copy in this repository), read once with its ``PublicSuffixList``, and
the record parser (``answer_to_dict``). authheaders' own ``dmarc_per_from`` is not used:
it re-reads the list on every call (about 70 ms each, several times a message), takes
the organizational domain of a name under an unlisted top-level domain (``.test``) to be
the TLD itself, asks the DNS through dnspython's default resolver, and loses domains
with a hyphen when it takes the SPF domain apart. The organizational domain here is
§3.2's: the public suffix (unlisted TLDs are suffixes by the ``*`` default rule) plus
one label.

DNS: every question goes to the ``lookup`` handed in (``resolver.BlockingLookup``,
monomail's ``[dns]``). Blocking: callers run `evaluate` in a worker thread.

Error handling: the DNS not answering (`DestinationError`) is ``temperror``; so is a
failure whose only aligned identifier got ``temperror`` from SPF or DKIM (a DNS
timeout is never a rejection by itself). A malformed policy record is ``permerror``.
"""

from __future__ import annotations

import importlib.resources
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from authheaders.dmarc_lookup import DMARCException, PublicSuffixList, answer_to_dict

from .errors import DestinationError

Lookup = Callable[[str, str], list[Any]]
POLICIES = ("none", "quarantine", "reject")

_psl: Any = None
_psl_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class DMARCResult:
    result: str  # "pass" | "fail" | "none" | "temperror" | "permerror"
    from_domain: str  # the RFC5322.From domain evaluated (header.from)
    policy: str = ""  # the policy that applies: "none" | "quarantine" | "reject" ("" without a record)
    reason: str = ""  # for the log


def _suffixes() -> Any:
    global _psl
    with _psl_lock:
        if _psl is None:
            ref = importlib.resources.files("authheaders") / "public_suffix_list.txt"
            with ref.open("r", encoding="utf-8") as f:
                _psl = PublicSuffixList(f)
        return _psl


def load_suffix_list() -> None:
    """Read the public suffix list now (about 50 ms; otherwise the first check does)."""
    _suffixes()


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix of ``domain`` plus one label (``domain`` itself
    when it is no longer than that)."""
    domain = domain.lower().rstrip(".")
    suffix = _suffixes().get_tld(domain, wildcard=True, strict=False) or domain.rpartition(".")[2]
    labels, keep = domain.split("."), suffix.count(".") + 2
    return ".".join(labels[-keep:]) if len(labels) > keep else domain


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (§3.1): strict ``s`` is the same name, relaxed ``r`` the same
    organizational domain."""
    if not domain:
        return False
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return domain == from_domain or organizational_domain(domain) == organizational_domain(from_domain)


def _record(domain: str, lookup: Lookup) -> dict[str, str] | None:
    """The one DMARC record at ``_dmarc.<domain>`` as tags, None for none or several
    (§6.6.3 step 5). Raises `DestinationError`, `DMARCException`."""
    found = [t for t in lookup(f"_dmarc.{domain}", "TXT")
             if t.startswith(b"v=DMARC1") and t[8:9].strip(b" \t") in (b"", b";")]
    if len(found) != 1:
        return None
    try:
        text = found[0].decode("ascii")
    except UnicodeDecodeError as exc:
        raise DMARCException(f"non-ASCII DMARC record at _dmarc.{domain}") from exc
    tags: dict[str, str] = answer_to_dict(text)
    return tags


def policy_record(from_domain: str, lookup: Lookup) -> tuple[dict[str, str] | None, bool]:
    """(the policy record's tags or None, whether it is the organizational domain's)."""
    rec = _record(from_domain, lookup)
    if rec is not None:
        return rec, False
    org = organizational_domain(from_domain)
    if org == from_domain:
        return None, False
    return _record(org, lookup), True


def evaluate(from_domain: str, *, spf: tuple[str, str] | None, dkim: Sequence[tuple[str, str]],
             lookup: Lookup) -> DMARCResult:
    """The DMARC result for ``from_domain`` given the SPF result ``(result, domain)``
    (None when SPF was not checked; the domain is the MAIL FROM domain, or the HELO name
    for ``<>``) and each DKIM signature's ``(result, d=)``. Blocking."""
    from_domain = from_domain.lower().rstrip(".")
    try:
        rec, inherited = policy_record(from_domain, lookup)
    except DestinationError as exc:
        return DMARCResult("temperror", from_domain, "", f"policy lookup: {exc.detail}")
    except DMARCException as exc:
        return DMARCResult("permerror", from_domain, "", f"policy record: {exc}")
    if rec is None:
        return DMARCResult("none", from_domain, "", "no DMARC record")
    policy = rec.get("sp", rec.get("p", "")) if inherited else rec.get("p", "")
    if policy not in POLICIES:  # §6.6.3 step 6: p=none if there is a report address, else nothing
        if "rua" not in rec:
            return DMARCResult("none", from_domain, "", f"no valid policy in the record (p={policy!r})")
        policy = "none"
    aspf = "s" if rec.get("aspf") == "s" else "r"
    adkim = "s" if rec.get("adkim") == "s" else "r"
    if spf is not None and spf[0] == "pass" and aligned(spf[1], from_domain, aspf):
        return DMARCResult("pass", from_domain, policy, f"SPF {spf[1]} aligned ({aspf})")
    for result, d in dkim:
        if result == "pass" and aligned(d, from_domain, adkim):
            return DMARCResult("pass", from_domain, policy, f"DKIM d={d} aligned ({adkim})")
    temporary = (spf is not None and spf[0] == "temperror" and aligned(spf[1], from_domain, aspf)) or any(
        result == "temperror" and aligned(d, from_domain, adkim) for result, d in dkim)
    if temporary:
        return DMARCResult("temperror", from_domain, policy, "an aligned identifier got a temporary error")
    return DMARCResult("fail", from_domain, policy, "no aligned SPF or DKIM pass")
