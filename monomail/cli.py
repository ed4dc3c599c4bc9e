"""The ``monomail`` command: serve, check-config, status, queue, route, passwd.

Job: parse arguments, load the config, call the right face, map failures to exit codes:
0 success, 1 runtime failure, 2 bad usage or bad configuration (the error names the
key). Every error is one line on stderr, never a traceback.

``queue`` (list, show, flush, hold, release, delete, with filters) is ``queuecmd``'s.

``passwd USER`` sets a password in ``auth.password_file`` (``passwords.set_password``): from
two prompts on a terminal, else from the first line of standard input.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import privileges
from .config import load
from .dkimsig import load_signer
from .dnscmd import add_parser as add_dns_parser
from .errors import ConfigError, SpoolBusy, SpoolError
from .maillog import printable
from .queuecmd import add_parser as add_queue_parser
from .settings import Config
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
    add_queue_parser(sub, common)
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
