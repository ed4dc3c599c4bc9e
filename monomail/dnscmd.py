"""``monomail dns DOMAIN``: the DNS records to publish; ``--check``: what the DNS has.

Job: the face of `dnsrecords`. It reads the domain's DKIM public keys (``dkimsig``), prints
the records in zone-file syntax, or, with ``--check``, asks the DNS through monomail's
own resolver and settings (``[dns]``: ``resolver.Resolver``), every question at once,
and prints one line per record — present, missing or different — with the one-line fix
under each that is not present, then the notes (e.g. a PTR it cannot check).

Exit status: 0 when every record is present; 1 when any is missing or different; 75
(EX_TEMPFAIL, "try again later") when none is wrong but a lookup failed (SERVFAIL,
timeout), so a script can tell "fix your DNS" from "could not ask"; 2 for a domain that
is not ours or an unreadable DKIM key (the error names the config key). Text from the DNS
reaches the terminal with control characters escaped.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from .config import load
from .dnsrecords import MISSING, PRESENT, Finding, Plan, Record, compare, needed, zone_text
from .errors import ConfigError, DestinationError
from .maillog import printable
from .settings import Config
from .sysexits import EX_TEMPFAIL


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``monomail dns`` under the ``monomail`` command's subparsers."""
    p = sub.add_parser("dns", parents=[common], help="print the DNS records a domain needs for this server "
                                                     "(--check: compare them with what the DNS has)")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--check", action="store_true",
                   help="ask the DNS (through [dns]) and report each record as present, missing or different")
    p.set_defaults(func=run)


def dkim_records(config: Config, domain: str) -> dict[str, str]:
    """selector → the TXT value of its public key. Raises ConfigError naming the key."""
    from .dkimsig import public_record

    d = config.dkim.get(domain)
    out: dict[str, str] = {}
    if d is None:
        return out
    for selector, path, key in ((d.selector, d.key, "key"), (d.ed25519_selector, d.ed25519_key, "ed25519_key")):
        if selector and path is not None:
            try:
                out[selector] = public_record(path)
            except (OSError, ValueError) as exc:
                raise ConfigError(f'dkim."{domain}".{key}', f"cannot read the DKIM key: {exc}") from exc
    return out


def plan_for(config: Config, domain: str) -> Plan:
    domain = domain.lower().rstrip(".")
    try:
        return needed(config, domain, dkim_records(config, domain))
    except ValueError as exc:
        raise ConfigError("", str(exc)) from exc


def _plain(rdtype: str, value: Any) -> str:
    if rdtype == "TXT":
        return bytes(value).decode("utf-8", "surrogateescape")
    if rdtype == "MX":
        return f"{value[0]} {value[1]}"
    return str(value)


async def _ask(config: Config, plan: Plan) -> dict[tuple[str, str], list[str] | DestinationError]:
    from .resolver import Resolver

    resolver = Resolver(config.dns.nameservers, config.dns.timeout)
    questions = list(dict.fromkeys(q for r in plan.records for q in r.lookups()))
    answers = await asyncio.gather(*(resolver.records(n, t) for n, t in questions), return_exceptions=True)
    out: dict[tuple[str, str], list[str] | DestinationError] = {}
    for (name, rdtype), answer in zip(questions, answers, strict=True):
        if isinstance(answer, DestinationError):
            out[(name, rdtype)] = answer
        elif isinstance(answer, BaseException):
            raise answer
        else:
            out[(name, rdtype)] = [_plain(rdtype, v) for v in answer]
    return out


def _label(r: Record) -> str:
    what = {"spf": " (SPF)", "dkim": " (DKIM)", "dmarc": " (DMARC)"}.get(r.kind, "")
    return f"{r.name} {r.type}{what}"


def check(config: Config, plan: Plan) -> int:
    answers = asyncio.run(_ask(config, plan))
    counts = {PRESENT: 0, MISSING: 0, "different": 0, "unknown": 0}
    for record in plan.records:
        found: list[str] = []
        failed: list[DestinationError] = []
        for q in record.lookups():
            answer = answers[q]
            if isinstance(answer, DestinationError):
                failed.append(answer)
            else:
                found.extend(answer)
        if failed:
            counts["unknown"] += 1
            print(f"{'unknown':9} {_label(record)}: {printable(str(failed[0].reply.text))}")
            continue
        finding: Finding = compare(record, found)
        counts[finding.status] += 1
        line = f"{finding.status:9} {_label(record)}"
        if finding.status == PRESENT:
            shown = ", ".join(finding.found) if record.kind in ("mx", "address", "ptr") else ""
            extra = "; ".join(x for x in (shown, finding.note) if x)
            print(line + (f" ({printable(extra)})" if extra else ""))
        else:
            if finding.status != MISSING:
                line += f": {printable(finding.note) + '; ' if finding.note else ''}has " + "; ".join(
                    printable(f) for f in finding.found)
            print(line)
            print(f"          fix: {printable(finding.fix)}")
    for note in plan.notes:
        print(f"note: {note}")
    print(f"-- {plan.domain}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "unknown"))
    if counts[MISSING] or counts["different"]:
        return 1
    return EX_TEMPFAIL if counts["unknown"] else 0


def run(args: argparse.Namespace) -> int:
    config = load(Path(args.config))
    plan = plan_for(config, args.domain)
    if args.check:
        return check(config, plan)
    sys.stdout.write(zone_text(plan, config.hostname))
    return 0
