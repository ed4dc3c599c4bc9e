"""``monomail sendmail``: the sendmail(8) command line, for programs that hand mail to
``/usr/sbin/sendmail`` (cron, PHP ``mail()``, git send-email, mutt, Symfony's ``-bs``).

Job: read one message on standard input, work out its envelope from the flags (and,
with ``-t``, from the To/Cc/Bcc fields), complete it as a local submission, and hand it
to monomail: the running server over SMTP, else the spool (``handover``). ``-bs`` speaks
SMTP on standard input and output on the server's own transaction core (``stdio``);
``-bp`` lists the queue and ``-q`` retries it (``monomail queue list/flush``);
``--help`` prints the flags. The parts:

- ``options``: the flags (sendmail and Postfix compatible, getopt style);
- ``compose``: reading, normalizing and completing the message;
- ``handover``: SMTP to the running server, or ``Spool.journal_new``;
- ``stdio``: ``-bs``.

The configuration is ``$MONOMAIL_CONFIG``, else ``./monomail.toml``, else
``/etc/monomail/monomail.toml``.

Exit status (sysexits.h), with a one-line reason on stderr, never a traceback:
0 sent or queued (``--help``: printed); 64 EX_USAGE bad flag, bad -f address or no
recipients; 65 EX_DATAERR NUL byte or message over ``server.max_message_size``;
67 EX_NOUSER a recipient refused permanently (the others are still sent);
69 EX_UNAVAILABLE the message refused permanently after DATA; 71 EX_OSERR standard
input unreadable; 75 EX_TEMPFAIL the spool cannot be written (whatever the reason),
interrupted, or any error nobody classified (DESIGN invariant 2: the caller keeps the
message and tries again); 78 EX_CONFIG no or bad configuration.

Not here: delivery (the server), the spool's format (``spool``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..config import load_config
from ..errors import Failure, ReplyError, UsageError
from ..settings import Config
from ..sysexits import EX_CONFIG, EX_DATAERR, EX_OK, EX_OSERR, EX_TEMPFAIL, EX_USAGE, fail, run, setup_logging
from .compose import argument_addresses, canonical, envelope_sender, login, normalize, prepare, read_message
from .handover import Result, describe, exit_code, submit
from .options import HELP, USAGE, Options, parse_args
from .stdio import StdioSMTP

PROG = "monomail sendmail"

__all__ = ["main", "deliver_mode", "PROG"]


def deliver_mode(opts: Options, config: Config, stdin: BinaryIO) -> int:
    """``-bm``, the default: one message from standard input to its recipients."""
    primary = config.local.primary_domain
    login_name, gecos = login()
    sender = envelope_sender(opts.sender, login_name, primary)
    try:
        raw = read_message(stdin, opts.ignore_dots)
    except OSError as exc:
        raise Failure(EX_OSERR, f"cannot read the message: {exc}") from None
    if b"\x00" in raw:
        raise Failure(EX_DATAERR, "the message contains a NUL byte")
    if len(raw) > config.server.max_message_size:
        raise Failure(EX_DATAERR, f"message too big: {len(raw)} bytes, the limit is "
                                  f"{config.server.max_message_size}")
    full_name = opts.full_name
    if full_name is None:  # the login's own name, unless -f names somebody else
        full_name = gecos if opts.sender is None else ""
    prepared = prepare(normalize(raw), from_address=sender or envelope_sender(None, login_name, primary),
                       full_name=full_name, hostname=config.hostname, extract=opts.extract)
    given = [addr for arg in opts.recipients for addr in argument_addresses(arg)]
    refused: dict[str, str] = {}
    recipients: list[str] = []
    for addr in [*given, *prepared.recipients]:
        try:
            rcpt = canonical(addr, primary)
        except ReplyError as exc:
            refused[addr] = str(exc.reply)
            continue
        if rcpt not in recipients:
            recipients.append(rcpt)
    if not recipients and not refused:
        raise UsageError("no recipients: give them as arguments, or use -t"
                         if not opts.extract else "no recipient addresses found in the message header")
    result = Result()
    if recipients:
        result = submit(config, sender, recipients, prepared.data, uid=os.getuid(), verbose=opts.verbose)
    refused.update(result.refused)
    if opts.verbose:
        if result.sent:
            print(f"{PROG}: sent to {', '.join(f'<{r}>' for r in result.sent)}: {result.server_reply}",
                  file=sys.stderr)
        if result.queued:
            print(f"{PROG}: queued as {result.queue_id} for {', '.join(f'<{r}>' for r in result.queued)}",
                  file=sys.stderr)
    if refused:
        raise Failure(exit_code(refused), f"recipient refused: {describe(refused)}")
    return EX_OK


def _cli(config: Config, *words: str) -> int:
    from ..cli import main as cli_main

    code = cli_main([*words, "-c", str(config.path)])
    return {0: EX_OK, 2: EX_CONFIG}.get(code, EX_TEMPFAIL)


def main(argv: Sequence[str] | None = None) -> int:
    """``monomail sendmail [flags] [recipients...]``; returns a sysexits code."""
    if argv is None:
        argv = sys.argv[1:]
        if Path(sys.argv[0]).name == "mailq":
            argv = ["-bp", *argv]
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        return fail(PROG, EX_USAGE, f"{exc} ({USAGE})")
    if opts.mode == "help":
        print(HELP)
        return EX_OK
    setup_logging(PROG, opts.verbose)
    return run(PROG, lambda: _mode(opts))


def _mode(opts: Options) -> int:
    config = load_config()
    if opts.mode == "p":
        return _cli(config, "queue", "list")
    if opts.mode == "q":
        return _cli(config, "queue", "flush")
    if opts.mode == "s":
        return StdioSMTP(config, opts, sys.stdin.buffer, sys.stdout.buffer).run()
    return deliver_mode(opts, config, sys.stdin.buffer)
