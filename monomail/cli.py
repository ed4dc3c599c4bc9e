"""The ``monomail`` command: serve, check-config, queue.

Job: parse arguments, load the config, call the right face, map failures to exit codes:
0 success, 1 runtime failure, 2 bad usage or bad configuration (the error names the
key). Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .config import Config, load
from .errors import ConfigError, SpoolError
from .spool import Spool


def _version() -> str:
    try:
        return version("monomail")
    except PackageNotFoundError:
        return "0+unknown"


def _load(path: str) -> Config:
    return load(Path(path))


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import run, setup_logging

    config = _load(args.config)
    setup_logging(config)
    return run(config)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    listen = ", ".join(str(x) for x in config.server.listen)
    print(f"{config.path}: OK (hostname {config.hostname}, listening on {listen}, "
          f"{len(config.users)} users, {len(config.aliases)} aliases, "
          f"domains {', '.join(sorted(config.local.domains))})")
    return 0


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_queue_list(args: argparse.Namespace) -> int:
    config = _load(args.config)
    spool = Spool(config.server.spool_dir)
    now = time.time()
    rows = 0
    for record in spool.records():
        qid = record["id"]
        pending = [r for r in record["recipients"] if r["state"] in ("pending", "failed")]
        errors = [r.get("last_error", "") for r in pending if r.get("last_error")]
        nexts = [r["next_attempt"] for r in pending if "next_attempt" in r]
        hold = " (held)" if record.get("hold") else ""
        print(f"{qid}  age {_age(now - record['received_at'])}  size {spool.message_size(qid)}"
              f"  from <{record['sender']}>{hold}")
        for r in pending:
            print(f"    {r['state']:8} <{r['address']}>  attempts {r.get('attempts', 0)}")
        if errors:
            print(f"    last error: {errors[-1]}")
        if nexts:
            print(f"    next attempt in {_age(min(nexts) - now)}")
        rows += 1
    print(f"-- {rows} message(s) in queue" if rows else "queue is empty")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monomail", description="A monolithic mail server.")
    parser.add_argument("--version", action="version", version=f"monomail {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default="monomail.toml",
                        help="configuration file (default: ./monomail.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", parents=[common], help="run the mail server")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", parents=[common], help="check the configuration and exit")
    p.set_defaults(func=cmd_check_config)
    q = sub.add_parser("queue", help="inspect the mail queue")
    qsub = q.add_subparsers(dest="queue_command", required=True)
    p = qsub.add_parser("list", parents=[common], help="list queued messages")
    p.set_defaults(func=cmd_queue_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"monomail: config error: {exc}", file=sys.stderr)
        return 2
    except SpoolError as exc:
        print(f"monomail: spool error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
