"""``monomail dkim keygen DOMAIN``: make a DKIM key and say what to publish.

Job: write a new private key (``dkimsig.keygen``: RSA 2048 bits or Ed25519, PEM, mode
0600, never over an existing file) to ``dkim/<domain>.<selector>.key`` next to the
config file (or ``--key PATH``), then print the TXT record to publish in zone-file
syntax (``dnsrecords.zone_line``: ``<selector>._domainkey.<domain>. IN TXT "..."``, the
value cut into strings of at most 255 octets, RFC 6376 §3.6.2.2, RFC 1035 §3.3.14) and the ``[dkim."<domain>"]``
lines to add to the config. Not here: signing (``dkimsig``, ``deliver``), the whole set
of records a domain needs (``monomail dns``). The config file is not read (the key can
be made before the config mentions it), only its directory is used.

Exit status: 0 done; 1 the key file exists or cannot be written (nothing changed);
2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import dkimsig, dnsrecords
from .configkeys import domain as parse_domain
from .errors import ConfigError

DEFAULT_SELECTOR = {"rsa": "mail", "ed25519": "ed"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monomail dkim", description="DKIM keys for signing outbound mail.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("keygen", help="write a new signing key and print the DNS record to publish")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--selector", help="the selector (default: mail for RSA, ed for Ed25519)")
    p.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa", help="key type (default: rsa, 2048 bits)")
    p.add_argument("-c", "--config", default="monomail.toml", help="configuration file (default: ./monomail.toml)")
    p.add_argument("--key", help="where to write the key (default: dkim/DOMAIN.SELECTOR.key next to the config)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        domain = parse_domain(args.domain, "DOMAIN")
    except ConfigError as exc:
        print(f"monomail dkim: {exc.message}", file=sys.stderr)
        return 2
    selector = args.selector or DEFAULT_SELECTOR[args.algorithm]
    if not all(part and part.replace("-", "").replace("_", "").isalnum() and part.isascii()
               for part in selector.split(".")):
        print(f"monomail dkim: not a DKIM selector: {selector!r}", file=sys.stderr)
        return 2
    base = Path(args.config).resolve().parent
    path = Path(args.key) if args.key else base / "dkim" / f"{domain}.{selector}.key"
    try:
        if not args.key:
            path.parent.mkdir(mode=0o700, exist_ok=True)
        record = dkimsig.keygen(domain, selector, args.algorithm, path)
    except FileExistsError:
        print(f"monomail dkim: {path} exists; not overwritten (choose another --selector or --key)",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"monomail dkim: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    shown = os.path.relpath(path.resolve(), base) if path.resolve().is_relative_to(base) else str(path.resolve())
    prefix = "" if args.algorithm == "rsa" else "ed25519_"
    print(f"; wrote {args.algorithm} key {path} (mode 0600); publish this record in the zone of {domain}:")
    print(dnsrecords.zone_line(dnsrecords.Record(f"{selector}._domainkey.{domain}", "TXT", record, "", "dkim")))
    print(f"# and add to {Path(args.config).name}:")
    print(f'[dkim."{domain}"]')
    print(f'{prefix}selector = "{selector}"')
    print(f'{prefix}key = "{shown}"')
    return 0
