"""``monomail sendmail``: the sendmail(8) command line, for programs that hand mail to
``/usr/sbin/sendmail`` (cron, PHP ``mail()``, git send-email, mutt, Symfony's ``-bs``).

Job: read one message on standard input, work out its envelope from the flags (and,
with ``-t``, from the To/Cc/Bcc fields), complete it as a local submission, and hand it
to monomail: the running server's local socket, else the drop folder or the spool
(``handover``). ``-bs`` speaks SMTP on standard input and output on the server's own
transaction core (``stdio``); ``-bp`` (and ``mailq``) lists the queue and ``-q``
retries it (``monomail queue list/flush``); ``-bi`` (and ``newaliases``) checks the
config, where the aliases are; ``--help`` prints the flags. The parts:

- ``options``: the flags (sendmail and Postfix compatible, getopt style);
- ``compose``: reading, normalizing and completing the message;
- ``handover``: the local socket, the drop folder (``maildrop``), or ``Spool.journal_new``;
- ``stdio``: ``-bs``.

Any user of the host may run it. The envelope sender is the caller's own
``login@primary_domain``: ``-f`` is honoured for trusted users only (root, the uid the
server runs as, ``local.trusted_users``, as sendmail's ``trusted-users``) and ignored
for others (``-v`` says so); the server enforces the same rule on its socket and on drop
files. Unqualified addresses, in the envelope and in the address fields, get
``local.primary_domain``. With ``-oem`` or ``-oee`` (cron's flags) refused recipients
do not fail the command: they become an RFC 3464 bounce (``dsn``) to the sender, and
the exit status is 0.

The configuration is ``$MONOMAIL_CONFIG``, else ``./monomail.toml``, else
``/etc/monomail/monomail.toml``.

Exit status (sysexits.h), with a one-line reason on stderr, never a traceback:
0 sent or queued (``--help``: printed; with ``-oem``: refusals bounced); 64 EX_USAGE bad flag, bad -f address or no
recipients; 65 EX_DATAERR NUL byte or message over ``server.max_message_size``;
67 EX_NOUSER a recipient refused permanently (the others are still sent);
69 EX_UNAVAILABLE the message refused permanently after DATA; 71 EX_OSERR standard
input unreadable; 75 EX_TEMPFAIL the spool cannot be written (whatever the reason),
interrupted, or any error nobody classified (DESIGN invariant 2: the caller keeps the
message and tries again); 78 EX_CONFIG no or bad configuration. ``mailq``: 69 when the
server is down and the spool cannot be read.

Not here: delivery (the server), the spool's format (``spool``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from .. import policy
from ..config import load_config
from ..control import RunningServer, running_server
from ..dsn import RecipientReport, build_report
from ..errors import ConfigError, Failure, ReplyError, UsageError
from ..record import parse_reply
from ..settings import Config
from ..sysexits import (
    EX_CONFIG,
    EX_DATAERR,
    EX_OK,
    EX_OSERR,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    fail,
    run,
    setup_logging,
)
from .compose import argument_addresses, canonical, envelope_sender, login, normalize, prepare, read_message
from .handover import Result, describe, exit_code, server_uid, submit
from .options import HELP, USAGE, Options, parse_args
from .stdio import StdioSMTP

PROG = "monomail sendmail"

__all__ = ["main", "deliver_mode", "newaliases", "PROG", "caller_trusted"]


def caller_trusted(config: Config, server: RunningServer | None) -> bool:
    """May the caller set the envelope sender (``-f``)?"""
    uid = os.getuid()
    return policy.trusted_user(uid, login()[0], config, server_uid(config, server))


def deliver_mode(opts: Options, config: Config, stdin: BinaryIO) -> int:
    """``-bm``, the default: one message from standard input to its recipients."""
    primary = config.local.primary_domain
    login_name, gecos = login()
    server = running_server(config)
    given_sender = opts.sender
    if given_sender is not None and given_sender.strip() not in ("", "<>") and not caller_trusted(config, server):
        if opts.verbose:
            print(f"{PROG}: -f {given_sender} ignored: only trusted users may set the sender", file=sys.stderr)
        given_sender = None
    sender = envelope_sender(given_sender, login_name, primary)
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
        full_name = gecos if given_sender is None else ""
    prepared = prepare(normalize(raw), from_address=sender or envelope_sender(None, login_name, primary),
                       full_name=full_name, hostname=config.hostname, extract=opts.extract, domain=primary)
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
        result = submit(config, sender, recipients, prepared.data, uid=os.getuid(), server=server,
                        verbose=opts.verbose)
    refused.update(result.refused)
    if opts.verbose:
        _say(result)
    if refused and opts.errors_mailed:
        return mail_errors_back(config, server, sender, refused, prepared.data, result.queue_id, opts.verbose)
    if refused:
        raise Failure(exit_code(refused), f"recipient refused: {describe(refused)}")
    return EX_OK


def _say(result: Result) -> None:
    if result.sent:
        print(f"{PROG}: sent to {', '.join(f'<{r}>' for r in result.sent)}: {result.server_reply}", file=sys.stderr)
    if result.queued:
        where = "left in the drop folder" if result.dropped else f"queued as {result.queue_id}"
        print(f"{PROG}: {where} for {', '.join(f'<{r}>' for r in result.queued)}", file=sys.stderr)


def mail_errors_back(config: Config, server: RunningServer | None, sender: str, refused: dict[str, str],
                     data: bytes, queue_id: str, verbose: bool) -> int:
    """``-oem``: the refused recipients as an RFC 3464 bounce to the sender (from ``<>``),
    exit 0; without a sender to tell (``<>``) they are only logged. A bounce that cannot be
    handed over either fails the command as a refusal would."""
    if not sender:
        print(f"{PROG}: recipient refused (null sender: no bounce): {describe(refused)}", file=sys.stderr)
        return EX_OK
    now = time.time()
    reports = []
    for rcpt, text in refused.items():
        reply = parse_reply(text)
        reports.append(RecipientReport(rcpt, "failed", reply.status or f"{str(reply.code)[:1]}.0.0", text))
    bounce = build_report(reporting_mta=config.hostname, sender=sender, queue_id=queue_id or "(not queued)",
                          arrival=now, reports=reports, original=data, now=now)
    result = submit(config, "", [sender], bounce, uid=os.getuid(), server=server, verbose=verbose)
    if verbose:
        _say(result)
    if result.refused:
        raise Failure(exit_code(refused), f"recipient refused: {describe(refused)}; "
                                          f"the bounce too: {describe(result.refused)}")
    return EX_OK


def newaliases(argv: Sequence[str] | None = None) -> int:
    """``newaliases`` / ``sendmail -bi``: there is no alias database to rebuild; check the
    config (78 when it is bad) and say where the aliases are read from."""
    setup_logging("newaliases", False)
    try:
        config = load_config()
    except ConfigError as exc:
        return fail("newaliases", EX_CONFIG, f"config error: {exc}")
    print(f"newaliases: {config.path}: OK; monomail reads its aliases from it ([aliases], "
          f"{len(config.aliases)} entries) at every delivery: nothing to rebuild")
    return EX_OK


def _cli(config: Config, *words: str) -> int:
    from ..cli import main as cli_main

    code = cli_main([*words, "-c", str(config.path)])
    return {0: EX_OK, 2: EX_CONFIG, EX_UNAVAILABLE: EX_UNAVAILABLE}.get(code, EX_TEMPFAIL)


def main(argv: Sequence[str] | None = None) -> int:
    """``monomail sendmail [flags] [recipients...]``; returns a sysexits code."""
    if argv is None:
        argv = sys.argv[1:]
        if Path(sys.argv[0]).name == "mailq":
            argv = ["-bp", *argv]
        elif Path(sys.argv[0]).name == "newaliases":
            return newaliases(argv)
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
    if opts.mode == "i":
        return newaliases()
    config = load_config()
    if opts.mode == "p":
        return _cli(config, "queue", "list")
    if opts.mode == "q":
        return _cli(config, "queue", "flush")
    if opts.mode == "s":
        return StdioSMTP(config, opts, sys.stdin.buffer, sys.stdout.buffer).run()
    return deliver_mode(opts, config, sys.stdin.buffer)
