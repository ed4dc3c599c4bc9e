"""The ``monomail`` command: serve, check-config, queue.

Job: parse arguments, load the config, call the right face, map failures to exit codes:
0 success, 1 runtime failure, 2 bad usage or bad configuration (the error names the
key). Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .config import load
from .control import notify_server
from .errors import ConfigError, SpoolError
from .settings import Config
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
        hold = " (held)" if record.get("hold") else ""
        print(f"{qid}  age {_age(now - record['received_at'])}  size {spool.message_size(qid)}"
              f"  from <{record['sender']}>{hold}")
        for r in record["recipients"]:
            if r["state"] == "delivered":
                continue
            print(f"    {r['state']:8} <{r['address']}>  attempts {r.get('attempts', 0)}")
            if r.get("last_error"):
                print(f"      last error: {r['last_error']}")
            if r["state"] == "pending" and "next_attempt" in r:
                print(f"      next attempt in {_age(r['next_attempt'] - now)}")
        rows += 1
    print(f"-- {rows} message(s) in queue" if rows else "queue is empty")
    return 0


def _spool(args: argparse.Namespace) -> tuple[Config, Spool]:
    config = _load(args.config)
    return config, Spool(config.server.spool_dir)


def _signal_server(config: Config) -> str:
    """Ask a running server to re-read the spool (SIGUSR1); say what happened."""
    pid = notify_server(config)
    return f"server (pid {pid}) notified" if pid else "server not running; takes effect when it starts"


def cmd_queue_show(args: argparse.Namespace) -> int:
    _, spool = _spool(args)
    record = spool.load(args.id)
    print(f"id:          {record['id']}")
    print(f"sender:      <{record['sender']}>")
    print(f"received:    {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(record['received_at']))}")
    print(f"size:        {spool.message_size(args.id)}")
    print(f"held:        {'yes' if record.get('hold') else 'no'}")
    for r in record["recipients"]:
        extra = []
        if r.get("next_attempt") and r["state"] == "pending":
            extra.append(f"next attempt in {_age(r['next_attempt'] - time.time())}")
        if r.get("last_error"):
            extra.append(f"last error: {r['last_error']}")
        print(f"recipient:   <{r['address']}> {r['state']}, attempts {r.get('attempts', 0)}"
              + ("".join(f"\n               {e}" for e in extra)))
    print()
    data = spool.message(args.id)
    end = data.find(b"\n\n")
    sys.stdout.write((data if end < 0 else data[: end + 1]).decode("utf-8", "replace"))
    return 0


def _edit(args: argparse.Namespace, change: str) -> int:
    config, spool = _spool(args)
    with spool.locked():
        if change == "delete":
            if not spool.exists(args.id):
                raise SpoolError(f"no queue entry {args.id}")
            spool.remove(args.id)
        else:
            record = spool.load(args.id)
            record["hold"] = change == "hold"
            if change == "release":
                for r in record["recipients"]:
                    if r["state"] == "pending":
                        r["next_attempt"] = 0
            spool.update(record)
    print(f"{args.id}: {change}d" if change != "hold" else f"{args.id}: held", "-", _signal_server(config))
    return 0


def cmd_queue_flush(args: argparse.Namespace) -> int:
    config, spool = _spool(args)
    with spool.locked():
        ids = [args.id] if args.id else spool.ids()
        for qid in ids:
            record = spool.load(qid)
            for r in record["recipients"]:
                if r["state"] == "pending":
                    r["next_attempt"] = 0
            spool.update(record)
    print(f"{len(ids)} entr{'y' if len(ids) == 1 else 'ies'} due now -", _signal_server(config))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from .explain import run
    from .tables import FileTables

    config = _load(args.config)
    report, ok = run(args.addresses, config, FileTables(), args.sender)
    sys.stdout.write(report)
    return 0 if ok else 2


_OWN_PARSERS = {"import": ".importer", "mail": ".reader", "sendmail": ".submit", "deliver": ".mda"}


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
    p = sub.add_parser("route", parents=[common], help="show where addresses go (like exim -bt), sending nothing")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument("--sender", help="show the envelope sender rewrites for mail from this address")
    p.set_defaults(func=cmd_route)
    sub.add_parser("import", help="translate /etc/aliases, virtusertable and .forward files into TOML "
                                  "(see monomail import --help)")
    sub.add_parser("mail", help="read a mailbox, binmail style (see monomail mail --help)")
    sub.add_parser("sendmail", help="submit a message, sendmail-compatible (see monomail sendmail --help)")
    sub.add_parser("deliver", help="deliver stdin to a local user, for other MTAs (see monomail deliver --help)")
    q = sub.add_parser("queue", help="inspect the mail queue")
    qsub = q.add_subparsers(dest="queue_command", required=True)
    p = qsub.add_parser("list", parents=[common], help="list queued messages")
    p.set_defaults(func=cmd_queue_list)
    p = qsub.add_parser("show", parents=[common], help="envelope, recipient states and headers of one entry")
    p.add_argument("id")
    p.set_defaults(func=cmd_queue_show)
    p = qsub.add_parser("flush", parents=[common], help="retry now (all entries, or one)")
    p.add_argument("id", nargs="?")
    p.set_defaults(func=cmd_queue_flush)
    for name, text in (("delete", "remove an entry without delivering it"),
                       ("hold", "keep an entry without retrying it"),
                       ("release", "undo hold and retry now")):
        p = qsub.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
        p.set_defaults(func=lambda a, change=name: _edit(a, change))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in _OWN_PARSERS:  # these parse their own (sendmail-style) flags
        module = importlib.import_module(_OWN_PARSERS[argv[0]], __package__)
        return module.main(argv[1:])
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
