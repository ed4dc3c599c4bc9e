"""The ``monomail`` command: serve, check-config, status, queue, route, passwd.

Job: parse arguments, load the config, call the right face, map failures to exit codes:
0 success, 1 runtime failure, 2 bad usage or bad configuration (the error names the
key). Every error is one line on stderr, never a traceback.

``queue list`` and ``queue show`` say for each recipient not yet delivered its state
(the mail log's words: deferred, failed), attempts, the last reply, its cause, the
remote host and the next attempt; damaged entries are listed with why (in the spool
still, or moved aside into ``corrupt/`` by the server). Text from the spool reaches the
terminal with control characters escaped.

``passwd USER`` sets a password in ``auth.password_file`` (``passwords.set_password``): from
two prompts on a terminal, else from the first line of standard input.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import privileges
from .config import load
from .control import ask_showq, notify_server
from .dkimsig import load_signer
from .dnscmd import add_parser as add_dns_parser
from .envelope import Status
from .errors import ConfigError, CorruptEntry, SpoolBusy, SpoolError
from .maillog import printable
from .message import header_block
from .queue import listing, recipient_lines
from .record import QueueEntry
from .settings import Config
from .spool import Spool
from .statuscmd import add_parser as add_status_parser
from .tls import make_context


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
    if config.tls.cert is not None and config.tls.key is not None:
        make_context(config.tls.cert, config.tls.key)  # ConfigError (tls.cert) if unusable
    load_signer(config)  # ConfigError (dkim."<domain>".key) if a key is unusable
    for warning in (*config.warnings, privileges.check(config)):
        if warning is None:
            continue
        print(f"warning: {warning}", file=sys.stderr)
    sub = config.submission
    listen = ", ".join([str(x) for x in config.server.listen] + [f"{x} (submission)" for x in sub.listen]
                       + [f"{x} (submission, implicit TLS)" for x in sub.listen_tls])
    print(f"{config.path}: OK (hostname {config.hostname}, listening on {listen}, "
          f"{len(config.users)} users, {len(config.aliases)} aliases, "
          f"domains {', '.join(sorted(config.local.domains))})")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP to the running server, then its answer (``control.ask_reload``): 0 taken, 2
    refused (the config error, as check-config prints it), 1 no answer. A file that does
    not load here is refused here, and the server is not disturbed."""
    from .control import ask_reload

    result = ask_reload(_load(args.config), args.timeout)
    if isinstance(result, str):
        print(f"monomail reload: {result}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not result.ok:
        print(f"monomail: {result.error}", file=sys.stderr)
        return 2 if result.error.startswith("config error:") else 1
    print(f"server (pid {result.pid}) read its configuration again: new sessions and deliveries use it")
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    """The whole queue; for a user who cannot read the spool, as the running server lists it
    (``localsubmit``'s showq socket); with neither, one line and 69 (EX_UNAVAILABLE)."""
    config = _load(args.config)
    spool = Spool(config.server.spool_dir)
    try:
        lines = listing(spool, time.time())
    except SpoolError as exc:
        if not isinstance(exc.__cause__, PermissionError):
            raise
        text = ask_showq(config)
        if text is None:
            print(f"monomail: mail system is down: the server is not running and the spool {spool.dir} "
                  "cannot be read", file=sys.stderr)
            return 69
        sys.stdout.write(text)
        return 0
    sys.stdout.write("".join(f"{line}\n" for line in lines))
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
    entry = spool.load(args.id)
    now = time.time()
    print(f"id:          {entry.id}")
    print(f"sender:      <{printable(entry.sender)}>")
    print(f"received:    {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(entry.received_at))}")
    print(f"size:        {spool.message_size(args.id)}")
    print(f"held:        {'yes' if entry.hold else 'no'}")
    for r in entry.recipients:
        extra = recipient_lines(r, now) if r.state is not Status.DELIVERED else []
        print(f"recipient:   <{printable(r.address)}> {r.state.value}, attempts {r.attempts}"
              + "".join(f"\n               {e}" for e in extra))
    print()
    data = spool.message(args.id)
    text = header_block(data).decode("utf-8", "replace")
    sys.stdout.write("".join(printable(line) + "\n" for line in text.splitlines()))
    return 0


def _release(entry: QueueEntry) -> QueueEntry:
    """Every deferred recipient due now."""
    return entry.updated({r.address: replace(r, next_attempt=0.0) for r in entry.deferred})


def _edit(args: argparse.Namespace, change: str) -> int:
    config, spool = _spool(args)
    with spool.locked():
        if change == "delete":
            if not spool.exists(args.id):
                raise SpoolError(f"no queue entry {args.id}")
            spool.remove(args.id)
        else:
            entry = replace(spool.load(args.id), hold=change == "hold")
            spool.update(_release(entry) if change == "release" else entry)
    print(f"{args.id}: {change}d" if change != "hold" else f"{args.id}: held", "-", _signal_server(config))
    return 0


def cmd_queue_flush(args: argparse.Namespace) -> int:
    config, spool = _spool(args)
    skipped = []
    with spool.locked():
        ids = [args.id] if args.id else spool.ids()
        for qid in ids:
            try:
                entry = spool.load(qid)
            except CorruptEntry:
                if args.id:
                    raise
                skipped.append(qid)
                continue
            spool.update(_release(entry))
    count = len(ids) - len(skipped)
    note = f" ({len(skipped)} damaged, left alone)" if skipped else ""
    print(f"{count} entr{'y' if count == 1 else 'ies'} due now{note} -", _signal_server(config))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from .explain import run
    from .tables import FileTables

    config = _load(args.config)
    report, ok = run(args.addresses, config, FileTables(config.local), args.sender)
    sys.stdout.write(report)
    return 0 if ok else 2


MAX_PASSWORD = 1024  # bytes; more is refused, not cut


def _new_password() -> bytes | str:
    """The new password (bytes), or why there is none (str)."""
    if sys.stdin.isatty():
        import getpass

        try:
            first = getpass.getpass("New password: ")
            second = getpass.getpass("Retype new password: ")
        except EOFError:
            return "no password given; nothing changed"
        if first != second:
            return "passwords do not match; nothing changed"
        password = first.encode("utf-8", "surrogateescape")
    else:
        line = sys.stdin.buffer.readline(MAX_PASSWORD + 2)
        password = line.removesuffix(b"\n").removesuffix(b"\r")
    if not password:
        return "empty password refused; nothing changed"
    if len(password) > MAX_PASSWORD:
        return f"password longer than {MAX_PASSWORD} bytes refused; nothing changed"
    return password


def cmd_passwd(args: argparse.Namespace) -> int:
    from .passwords import set_password

    config = _load(args.config)
    user = args.user.lower()
    if user not in config.users:
        print(f"monomail passwd: no such user in [users]: {printable(args.user)}", file=sys.stderr)
        return 2
    if config.auth.dovecot is not None:
        print(f"monomail passwd: passwords are Dovecot's here (auth.dovecot = {config.auth.dovecot}); "
              "set them in Dovecot", file=sys.stderr)
        return 2
    password = _new_password()
    if isinstance(password, str):
        print(f"monomail passwd: {password}", file=sys.stderr)
        return 1
    set_password(config.auth.password_file, user, password)
    print(f"password set for {user}")
    return 0


_OWN_PARSERS = {"import": ".importer", "mail": ".reader", "sendmail": ".sendmail", "deliver": ".mda",
                "dkim": ".dkimcmd"}


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
    p = sub.add_parser("reload", parents=[common], help="make the running server read its configuration again")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for its answer (default 30)")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("route", parents=[common], help="show where addresses go (like exim -bt), sending nothing")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument("--sender", help="show the envelope sender rewrites for mail from this address")
    p.set_defaults(func=cmd_route)
    add_dns_parser(sub, common)
    add_status_parser(sub, common)
    p = sub.add_parser("passwd", parents=[common], help="set a user's password for AUTH (read from standard input)")
    p.add_argument("user", metavar="USER")
    p.set_defaults(func=cmd_passwd)
    sub.add_parser("import", help="translate /etc/aliases, virtusertable and .forward files into TOML "
                                  "(see monomail import --help)")
    sub.add_parser("mail", help="read a mailbox, binmail style (see monomail mail --help)")
    sub.add_parser("sendmail", help="submit a message, sendmail-compatible (see monomail sendmail --help)")
    sub.add_parser("deliver", help="deliver stdin to a local user, for other MTAs (see monomail deliver --help)")
    sub.add_parser("dkim", help="make a DKIM signing key: monomail dkim keygen DOMAIN (see monomail dkim --help)")
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
    except SpoolBusy as exc:
        print(f"monomail: cannot start: {exc}", file=sys.stderr)
        return 1
    except SpoolError as exc:
        print(f"monomail: spool error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `monomail queue list | head`: the reader is gone, and that is fine
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"monomail: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # never a traceback: one line, and the cause
        print(f"monomail: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
