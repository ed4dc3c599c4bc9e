"""``monomail import`` as a function (`convert`) and as a command (`main`).

Job: wire reading, translating and writing together, and the command line around them:
the TOML on stdout, one ``monomail import: FILE:LINE: ...`` line on stderr for each
thing not translated, exit 0; a named file that cannot be read is one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .model import DOMAIN, ImportResult
from .reading import Reader
from .render import render
from .translate import translate


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
    if not DOMAIN.match(domain):
        raise ValueError(f"not a domain name: {domain!r}")
    reader = Reader(domain)
    if aliases is not None:
        reader.parse_aliases(Path(aliases))
    if virtusertable is not None:
        reader.parse_virtusertable(Path(virtusertable))
    for user, path in forwards:
        reader.parse_forward(user, Path(path))
    translation = translate(reader)
    return ImportResult(render(reader, translation), translation.report)


def _forward_arg(text: str) -> tuple[str, Path]:
    user, eq, path = text.partition("=")
    if not eq or not user or not path:
        raise argparse.ArgumentTypeError(f"expected USER=FILE, got {text!r}")
    return user, Path(path)


def _domain_arg(text: str) -> str:
    domain = text.strip().rstrip(".").lower()
    if not DOMAIN.match(domain):
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
