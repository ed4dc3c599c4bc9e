"""The DNS records a domain must publish for this server, and how the DNS compares.

Job: pure. From the config and the DKIM public records handed in (the caller reads the
key files), `needed` lists every record a domain needs so that mail to it reaches this
server and mail from it passes SPF, DKIM and DMARC at the receiver; `zone_text` prints
them in zone-file syntax (RFC 1035 §5: ``name. TTL IN TYPE value``, ``;`` comments, TXT
values cut into strings of at most 255 octets as RFC 1035 §3.3.14 and RFC 6376 §3.6.2.2
require); `compare` judges what the DNS answered for one record: present, missing or
different, with the one-line fix. Not here: asking the DNS (``dnscmd`` does, through
``resolver``) and DKIM keys (``dkimsig``).

The records, and the choices where the config leaves room:

- **MX** (RFC 5321 §5.1) of the domain → ``hostname``. Only for a domain we receive mail
  for (``local.domains``, ``[virtual]``); a domain that is only a masquerading or DKIM
  target gets a note instead. Present when one of the MX records names our host (other
  MX hosts, backups, are allowed).
- **SPF** (RFC 7208) of the domain: ``v=spf1 mx -all`` (our MX host's addresses may send
  for it, nothing else). With ``remote.smarthost`` all mail leaves through the smarthost,
  whose addresses the receiver sees: ``a:HOST`` (or ``ip4:``/``ip6:`` for an address
  literal) is added, with a note to use the provider's own ``include:`` if it publishes
  one. Without a smarthost, the host name gets ``v=spf1 a -all`` too: bounces have the
  null sender, and then the receiver checks the HELO name (RFC 7208 §2.3). A published
  record counts as present when it holds every term of ours (it may allow more); two SPF
  records are a permerror (§4.5), reported as different.
- **DKIM** (RFC 6376 §3.6.1) ``<selector>._domainkey.<domain>`` for each configured key,
  RSA and Ed25519. Present when a TXT record there has the same ``k=`` and ``p=``.
- **DMARC** (RFC 7489 §6.1) ``_dmarc.<domain>``: ``v=DMARC1; p=none;
  rua=mailto:postmaster@<domain>``, noted as the start: move to ``quarantine`` then
  ``reject`` once the reports show all your mail aligned. Any one valid DMARC record
  counts as present (a stricter policy is the point of the note); two are different.
- **A/AAAA** of the host name the MX names: the addresses in ``server.listen``. A
  public address, or a loopback one (a server listening only on loopback is reachable
  only here: its records serve a local test zone, and say so), is printed and compared.
  When the config names only ``0.0.0.0``/``::`` or private addresses (behind NAT), it
  does not tell the public address: one A record is printed commented out, and any A or
  AAAA of the host counts.
- **PTR** (reverse DNS; receivers want it to name the host, RFC 8601's ``iprev``,
  RFC 1912 §2.1): for each public listen address, its PTR → ``hostname``. For any other
  address it is not checked, and a note says to set it for the server's public address
  (with whoever hosts that address, not in your zone).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .settings import Config

TTL = 3600
PRESENT, MISSING, DIFFERENT = "present", "missing", "different"


@dataclass(frozen=True, slots=True)
class Record:
    """One record to publish. ``value`` is the data in plain form: MX ``"10 host"``, TXT
    the text itself (unquoted, unsplit), A/AAAA the address, PTR the host; ``""`` when the
    config cannot tell it (an address record of a server behind NAT): then any value
    counts and the record is printed commented out. ``kind`` says how it is compared."""

    name: str  # absolute, lower case, without the final dot
    type: str  # "MX" | "TXT" | "A" | "AAAA" | "PTR"
    value: str
    comment: str
    kind: str  # "mx" | "spf" | "dkim" | "dmarc" | "address" | "ptr"

    def lookups(self) -> tuple[tuple[str, str], ...]:
        """The questions to ask the DNS for this record: (name, type) pairs."""
        if self.kind == "address" and not self.value:
            return ((self.name, "A"), (self.name, "AAAA"))
        return ((self.name, self.type),)


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``monomail dns DOMAIN`` prints: the records and the notes about them."""

    domain: str
    records: tuple[Record, ...]
    notes: tuple[str, ...]  # what is not a record: PTR not checked, no DKIM key, ...


@dataclass(frozen=True, slots=True)
class Finding:
    record: Record
    status: str  # PRESENT | MISSING | DIFFERENT
    found: tuple[str, ...]  # what the DNS has (relevant records only), as plain values
    fix: str  # one line; "" when present
    note: str = ""  # e.g. the published DMARC policy


def our_domains(config: Config) -> set[str]:
    """The domains ``monomail dns`` answers for."""
    return set(config.local.domains) | set(config.virtual) | set(config.masquerade.domains) | set(config.dkim)


def _address_kind(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    return "public" if ip.is_global else "private"


def _smarthost_host(value: str) -> str:
    """``host:port`` or ``[address]:port`` (the forms ``remote.smarthost`` takes) → host."""
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if ":" in value else value


def _spf(config: Config) -> tuple[str, str]:
    """The domain's SPF value and why."""
    smarthost = config.remote.smarthost
    if not smarthost:
        return "v=spf1 mx -all", "only this server (the domain's MX host) sends mail for the domain"
    host = _smarthost_host(smarthost)
    try:
        ip = ipaddress.ip_address(host)
        term = f"ip{ip.version}:{ip}"
    except ValueError:
        term = f"a:{host}"
    return (f"v=spf1 mx {term} -all",
            f"mail leaves through the smarthost {smarthost}: {term} allows the addresses its name has; "
            "if your provider publishes an SPF include (include:...), use that instead")


def needed(config: Config, domain: str, dkim_records: Mapping[str, str]) -> Plan:
    """The records ``domain`` needs for this server. ``dkim_records``: selector → the
    TXT value of its public key (``dkimsig.public_record``), for the domain's
    ``[dkim]`` selectors. Raises ValueError for a domain that is not ours."""
    domain = domain.lower().rstrip(".")
    if domain not in our_domains(config):
        raise ValueError(f"{domain} is not one of our domains (local.domains, virtual, masquerade.domains, dkim)")
    host = config.hostname.lower().rstrip(".")
    records: list[Record] = []
    notes: list[str] = []
    if domain in config.local.domains or domain in config.virtual:
        records.append(Record(domain, "MX", f"10 {host}", f"mail for {domain} comes to this server, {host}", "mx"))
    else:
        notes.append(f"no MX: mail for {domain} is not received here (not in local.domains or virtual)")
    spf, why = _spf(config)
    records.append(Record(domain, "TXT", spf, f"SPF: {why}", "spf"))
    dkim = config.dkim.get(domain)
    if dkim is None:
        notes.append(f"no DKIM key for {domain}: run `monomail dkim keygen {domain}` and add [dkim.\"{domain}\"]"
                     " to the config, then print these records again")
    else:
        for selector, path, algorithm in ((dkim.selector, dkim.key, "RSA"),
                                          (dkim.ed25519_selector, dkim.ed25519_key, "Ed25519")):
            if selector and selector in dkim_records:
                records.append(Record(f"{selector}._domainkey.{domain}", "TXT", dkim_records[selector],
                                      f"DKIM: the public {algorithm} key of selector {selector} ({path})", "dkim"))
    records.append(Record(
        f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}",
        "DMARC: p=none only asks for reports (sent to rua); once they show all your mail passing, "
        "move to p=quarantine, then p=reject", "dmarc"))
    if not config.remote.smarthost:
        records.append(Record(host, "TXT", "v=spf1 a -all",
                              f"SPF of the host name: bounces (null sender) are checked against HELO {host}", "spf"))
    records.extend(_addresses(config, host, notes))
    return Plan(domain, tuple(records), tuple(notes))


def _addresses(config: Config, host: str, notes: list[str]) -> list[Record]:
    out: list[Record] = []
    unknown: list[str] = []  # listen addresses that do not tell the public one
    unchecked: list[str] = []  # listen addresses whose PTR is not ours to check
    for address in dict.fromkeys(str(ipaddress.ip_address(x.host)) for x in config.server.listen):
        kind = _address_kind(address)
        rtype = "AAAA" if ":" in address else "A"
        if kind in ("public", "loopback"):
            comment = f"the address of {host}, which the MX names (server.listen)"
            if kind == "loopback":
                comment += f"; {address} is loopback: only for a local test zone, publish the public address instead"
            out.append(Record(host, rtype, address, comment, "address"))
        else:
            unknown.append("all addresses" if kind == "unspecified" else f"{address} (private: behind NAT?)")
        if kind == "public":
            out.append(Record(ipaddress.ip_address(address).reverse_pointer, "PTR", host,
                              f"reverse DNS of {address} -> {host}: set it with whoever hosts the address", "ptr"))
        else:
            unchecked.append(f"{address} ({'all addresses' if kind == 'unspecified' else kind})")
    if unknown and not out:
        out.append(Record(host, "A", "", f"the address of {host}, which the MX names: the server listens on "
                          f"{', '.join(dict.fromkeys(unknown))}, so put its public address here (and/or an AAAA); "
                          "--check counts any address", "address"))
    if unchecked:
        notes.append(f"PTR not checked for {', '.join(unchecked)}: set the reverse DNS (PTR) of the server's "
                     f"public address to {host}, with whoever hosts that address")
    return out


# -- zone-file text --------------------------------------------------------------------------


def txt_strings(value: str) -> str:
    """A TXT value as quoted strings of at most 255 octets each (RFC 1035 §3.3.14)."""
    raw = value.encode()
    parts = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + p.decode("ascii", "backslashreplace").replace("\\", "\\\\").replace('"', '\\"') + '"'
                    for p in parts)


def rdata_text(record: Record) -> str:
    if record.type == "TXT":
        return txt_strings(record.value)
    if record.type == "MX":
        pref, _, host = record.value.partition(" ")
        return f"{pref} {host}."
    if record.type == "PTR":
        return f"{record.value}."
    return record.value or f"<public IPv{'6' if record.type == 'AAAA' else '4'} address of the server>"


def zone_line(record: Record, ttl: int = TTL) -> str:
    """``name. TTL IN TYPE value``; commented out when the config cannot tell the value."""
    line = f"{record.name}. {ttl} IN {record.type} {rdata_text(record)}"
    return line if record.value else f"; {line}"


def zone_text(plan: Plan, hostname: str, ttl: int = TTL) -> str:
    lines = [f"; DNS records for {plan.domain}, for the mail server {hostname} (monomail dns)",
             f"; check what the DNS has with: monomail dns --check {plan.domain}"]
    lines += [f"; NOTE: {n}" for n in plan.notes]
    for r in plan.records:
        lines += ["", f"; {r.comment}", zone_line(r, ttl)]
    return "\n".join(lines) + "\n"


# -- comparing -------------------------------------------------------------------------------


def _tags(value: str) -> dict[str, str]:
    """``k=v; k=v`` tag lists (DKIM RFC 6376 §3.2, DMARC RFC 7489 §6.4), white space removed
    around names and from values (DKIM's base64 may be folded)."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        name, eq, val = part.partition("=")
        if eq:
            out[name.strip().lower()] = "".join(val.split())
    return out


def _fix(record: Record, found: Sequence[str], verb: str = "") -> str:
    line = zone_line(record).removeprefix("; ")
    if not found:
        return f"add: {line}"
    return f"{verb or 'replace'} {record.name} {record.type} ({'; '.join(found)}) with: {line}"


def compare(record: Record, found: Sequence[str]) -> Finding:
    """What the DNS has for ``record`` (plain values of its lookups: TXT text, MX
    ``"pref host"``, addresses, PTR hosts) judged against it."""
    if record.kind in ("spf", "dmarc"):
        prefix = "v=spf1" if record.kind == "spf" else "v=DMARC1"
        found = [f for f in found if f.split(";")[0].split(" ")[0].strip().lower() == prefix.lower()]
    elif record.kind == "dkim":
        found = [f for f in found if "p" in _tags(f)]
    found_t = tuple(found)
    if not found:
        return Finding(record, MISSING, found_t, _fix(record, found))

    def result(ok: bool, note: str = "", verb: str = "") -> Finding:
        return Finding(record, PRESENT if ok else DIFFERENT, found_t, "" if ok else _fix(record, found, verb), note)

    if record.kind in ("spf", "dmarc") and len(found) > 1:
        return result(False, f"{len(found)} {record.kind.upper()} records: receivers use none of them",
                      "keep only one record:")
    if record.kind == "mx":
        hosts = {f.partition(" ")[2].lower().rstrip(".") for f in found}
        return result(record.value.partition(" ")[2] in hosts)
    if record.kind == "spf":
        ours = set(record.value.lower().split())
        return result(ours <= set(found[0].lower().split()))
    if record.kind == "dkim":
        want = _tags(record.value)
        ok = any(_tags(f).get("p") == want.get("p") and _tags(f).get("k", "rsa") == want.get("k", "rsa")
                 for f in found)
        return result(ok)
    if record.kind == "dmarc":
        policy = _tags(found[0]).get("p", "")
        return result(policy in ("none", "quarantine", "reject"), f"policy p={policy}" if policy else "no p= tag")
    if record.kind == "address":
        if not record.value:
            return result(True, "the config does not say the public address: not compared")
        return result(str(ipaddress.ip_address(record.value)) in {str(ipaddress.ip_address(f)) for f in found})
    return result(record.value.lower() in {f.lower().rstrip(".") for f in found})  # ptr
