"""Checking mail that arrives from outside: SPF, DKIM and DMARC, and what they mean for it.

Job: for one message received on the MX port from an untrusted, unauthenticated client
(the server decides that), run the checks ``[checks]`` asks for, SPF (``spfcheck``,
RFC 7208), DKIM (``dkimsig.verify``, RFC 6376) and DMARC (``dmarc``, RFC 7489), and
say what becomes of the message (`Verdict`): the one ``Authentication-Results`` field
naming our hostname (``authresults``, RFC 8601) to add, the message cleaned of fields
that only monomail may write, and the action:

- ``reject``: ``dmarc = "enforce"`` and DMARC fails under ``p=reject`` (``sp=`` for a
  subdomain): the server answers DATA with `DMARC_REJECTED` (``550 5.7.1``), so the
  message is neither queued nor bounced;
- ``quarantine``: the same under ``p=quarantine``: delivered with `QUARANTINE_FIELD`
  (``X-Spam-Flag: YES``) on top; ``deliver`` puts such a message in a Maildir user's
  ``.Junk`` folder (`quarantined`), and mbox users get it flagged;
- ``accept`` otherwise: ``"monitor"`` only records the result, ``"off"`` skips DMARC,
  and a ``temperror`` (a DNS timeout) is recorded, never acted on.

Not here: which sessions are checked (``server``), the checks themselves, delivery.

Cleaning (RFC 8601 §5): every Authentication-Results field that claims our hostname as
its authserv-id (case-insensitively) is removed, and so is every ``X-Spam-Flag`` field,
whatever its value: in the delivered message that field is monomail's verdict.
Fields for other authserv-ids are kept. Submitted mail (an authenticated client) is not
checked, but loses the Authentication-Results fields claiming our hostname all the same
(`without_our_results`); mail from the trusted networks is left as it is.

How the quarantine verdict reaches delivery: as the message's first field. The added
fields go on top in this order: ``X-Spam-Flag: YES`` (when quarantined), then the
Authentication-Results field, then our Received field and the client's content. So
`quarantined` asks only whether the stored message *begins* with that exact line: the
client cannot remove it, cannot fold a continuation line into it (our own field follows
it), and an ``X-Spam-Flag`` of its own is removed before delivery and could at most push
a message into Junk, never out of it. The verdict is in the spooled message, so a
delivery retried later still honours it.

Event loop: everything that blocks (pyspf, dkimpy's RSA and hashing, the header walk,
the one copy of the message) runs in one worker thread; its DNS questions go through
monomail's resolver and ``[dns]`` (``resolver.BlockingLookup``). A message's questions
share a budget (`MAX_QUESTIONS`, and four times ``dns.timeout`` in all): past it they
fail at once as ``temperror``, so a message full of signatures naming silent name
servers cannot hold a thread for long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import authresults, dkimsig, dmarc, spfcheck
from .errors import DestinationError, Reply
from .message import from_addresses, header_fields, split_header
from .resolver import BlockingLookup, Resolver
from .settings import Config

ACCEPT, REJECT, QUARANTINE = "accept", "reject", "quarantine"
QUARANTINE_FIELD = b"X-Spam-Flag: YES\n"
DMARC_REJECTED = Reply(550, "5.7.1", "Message refused: it fails its sender domain's DMARC policy")
MAX_QUESTIONS = 40  # DNS questions one message's checks may ask
MAX_FROM_DOMAINS = 4  # From domains evaluated for DMARC; more fail as under p=reject
_FLAG_NAME = b"x-spam-flag"
_AR_NAME = b"authentication-results"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the checks make of one message."""

    header: bytes  # the fields monomail adds (X-Spam-Flag when quarantined, Authentication-Results)
    message: bytes  # what to queue: ``header`` on top of the cleaned message (b"" when rejected)
    action: str  # ACCEPT | REJECT | QUARANTINE
    reply: Reply | None = None  # for REJECT: the answer to DATA
    spf: spfcheck.SPFResult | None = None
    dkim: tuple[dkimsig.DKIMResult, ...] = ()
    dmarc: tuple[dmarc.DMARCResult, ...] = ()
    removed: int = 0  # fields removed from the message (forged Authentication-Results, X-Spam-Flag)

    @property
    def summary(self) -> str:
        """The results in one line, for the log."""
        parts = []
        if self.spf is not None:
            parts.append(f"spf={self.spf.result} ({self.spf.identity} {self.spf.domain or '-'})")
        parts += [f"dkim={d.result} (d={d.domain} s={d.selector}: {d.reason})" for d in self.dkim]
        parts += [f"dmarc={d.result} (from={d.from_domain or '-'} p={d.policy or '-'}: {d.reason})"
                  for d in self.dmarc]
        if self.removed:
            parts.append(f"(removed {self.removed} field(s) only monomail may write)")
        return " ".join(parts) or "no checks"


def quarantined(data: bytes) -> bool:
    """Does this stored message carry monomail's quarantine verdict (its first field)?"""
    return data.startswith(QUARANTINE_FIELD)


def prepend(fields: bytes, data: bytes) -> bytes:
    """Header ``fields`` on top of a stored message, below the quarantine verdict, which
    must stay its first field (a list post of a quarantined message stays quarantined)."""
    if quarantined(data):
        return QUARANTINE_FIELD + fields + data[len(QUARANTINE_FIELD):]
    return fields + data


class _Budget:
    """A lookup that asks through ``lookup`` until the message's budget is spent."""

    def __init__(self, lookup: Callable[[str, str], list[Any]], questions: int, seconds: float) -> None:
        self.lookup = lookup
        self.left = questions
        self.deadline = time.monotonic() + seconds

    def __call__(self, name: str, rdtype: str) -> list[Any]:
        self.left -= 1
        if self.left < 0 or time.monotonic() > self.deadline:
            raise DestinationError(Reply(451, "4.4.3", "DNS budget for this message spent"),
                                   f"{name} {rdtype}: not asked, the message's DNS budget is spent")
        return self.lookup(name, rdtype)


def _from_domains(header: bytes) -> list[str]:
    out: list[str] = []
    for address in from_addresses(header):
        domain = spfcheck.domain_name(address.rpartition("@")[2]) if "@" in address else ""
        if domain and domain not in out:
            out.append(domain)
    return out


def _clean(header: bytes, hostname: str, flag: bool = True) -> tuple[list[bytes], int]:
    """The header fields to keep (all, when nothing is removed) and how many went:
    Authentication-Results claiming ``hostname``, and X-Spam-Flag when ``flag``."""
    kept: list[bytes] = []
    removed = 0
    for f in header_fields(header):
        name, _, value = f.partition(b":")
        name = name.strip().lower()
        if (flag and name == _FLAG_NAME) or (name == _AR_NAME and authresults.claims(value, hostname)):
            removed += 1
        else:
            kept.append(f)
    return kept, removed


def without_our_results(data: bytes, hostname: str) -> tuple[bytes, int]:
    """``data`` without the Authentication-Results fields that claim ``hostname``, and how
    many went: for submitted mail, which is not checked, so that a user cannot hand
    results monomail never found to another user or, forwarded, to the world under our
    ARC seal. Cheap (the header only; the message is copied only when a field goes)."""
    header, _ = split_header(data)
    kept, removed = _clean(header, hostname, flag=False)
    return (b"".join([*kept, data[len(header):]]), removed) if removed else (data, 0)


def evaluate(data: bytes, *, client_ip: str, helo: str, sender: str, config: Config,
             lookup: Callable[[str, str], list[Any]]) -> Verdict:
    """The checks and the verdict for ``data`` (LF-ended, our Received field on top).
    Blocking: run it in a worker thread."""
    checks = config.checks
    header, _ = split_header(data)
    spf = spfcheck.check(client_ip, sender, helo, lookup) if checks.spf else None
    sigs = tuple(dkimsig.verify(data, lookup)) if checks.dkim else ()
    results: list[dmarc.DMARCResult] = []
    if checks.dmarc != "off" and (checks.spf or checks.dkim):
        domains = _from_domains(header)
        spf_id = (spf.result, spf.domain) if spf is not None else None
        dkim_ids = [(s.result, s.domain) for s in sigs]
        if len(domains) > MAX_FROM_DOMAINS:  # too many to evaluate: a way around a policy (RFC 7489 §6.6.1)
            results = [dmarc.DMARCResult("fail", domains[0], "reject", f"{len(domains)} From domains")]
        else:
            results = [dmarc.evaluate(d, spf=spf_id, dkim=dkim_ids, lookup=lookup) for d in domains]
        if not domains:
            results = [dmarc.DMARCResult("permerror", "", "", "no From domain to evaluate")]
    action = ACCEPT
    if checks.dmarc == "enforce":
        failed = {r.policy for r in results if r.result == "fail"}
        action = REJECT if "reject" in failed else QUARANTINE if "quarantine" in failed else ACCEPT
    clauses: list[authresults.Clause] = []
    if spf is not None:
        clauses.append(authresults.spf_clause(spf.result, spf.identity, spf.domain))
    if checks.dkim:
        clauses += [authresults.dkim_clause(s.result, s.domain, s.selector, s.header_b) for s in sigs]
        if not sigs:
            clauses.append(authresults.Clause("dkim", "none"))
    clauses += [authresults.dmarc_clause(r.result, r.from_domain, r.policy) for r in results]
    added = (QUARANTINE_FIELD if action == QUARANTINE else b"") + authresults.field(config.hostname, clauses)
    if action == REJECT:
        return Verdict(added, b"", REJECT, DMARC_REJECTED, spf, sigs, tuple(results))
    kept, removed = _clean(header, config.hostname)
    message = b"".join([added, *kept, data[len(header):]]) if removed else added + data
    return Verdict(added, message, action, None, spf, sigs, tuple(results), removed)


async def check(data: bytes, *, client_ip: str, helo: str, sender: str, config: Config,
                resolver: Resolver) -> Verdict:
    """`evaluate` in a worker thread, its DNS through ``resolver`` (on this event loop)."""
    lookup = _Budget(BlockingLookup(resolver, asyncio.get_running_loop()), MAX_QUESTIONS,
                     4 * config.dns.timeout)
    return await asyncio.to_thread(evaluate, data, client_ip=client_ip, helo=helo, sender=sender,
                                   config=config, lookup=lookup)


def prepare() -> None:
    """Read what the first check would otherwise read (the public suffix list). Blocking."""
    dmarc.load_suffix_list()
