"""``monomail deliver``: a local delivery agent for another MTA, as ``procmail -d`` or
``dovecot-lda`` are.

Job: read one message on standard input and deliver it to one local user with
monomail's own engine, so that Postfix (``mailbox_command``), Exim (a ``pipe``
transport) or sendmail (``Mlocal``) hand their local mail to monomail's mailboxes, with
its locking, fsync discipline and per-user recipes::

    # Postfix main.cf
    mailbox_command = /usr/bin/monomail deliver -c /etc/monomail/monomail.toml -u "$USER" -f "$SENDER"

The recipient is ``USER@<primary domain>``, routed by ``deliver.Deliverer.attempt``
exactly like mail that arrived over SMTP (aliases, forwards, recipes). ``-a ADDRESS``
(the original recipient) is used instead when it is in one of our local domains and
names the same user (``alice+news@``), so tags reach recipes and ``Delivered-To``;
otherwise it is ignored. ``-f SENDER`` is the envelope sender (``Return-Path``); without
it, the sender of a leading mbox ``From `` line, else the null sender. ``-d`` is a
synonym of ``-u`` (procmail, dovecot-lda).

The message: CRLF becomes LF; a leading ``From `` line (Postfix's local(8) prepends one)
is dropped; ``Return-Path`` fields are dropped (the final delivery writes the one
true ``Return-Path``, RFC 5321 §4.4; Postfix prepends its own). Nothing else is added
but what the deliverer adds (``Return-Path``, ``Delivered-To``). New messages a
delivery makes (a list post, a recipe's forward) are journalled in monomail's spool
before success is reported, and a running server is told (SIGUSR1).

Exit status (sysexits.h), the one thing the calling MTA sees, with a one-line reason on
stderr: 0 delivered; 67 EX_NOUSER unknown user (the MTA bounces); 69 EX_UNAVAILABLE
another permanent refusal (a forward's remote host said 5xx, a loop); 75 EX_TEMPFAIL
everything else: a locked mailbox, a full disk, a bad command line or configuration,
anything unexpected — the MTA keeps the message and retries, so nothing is lost for a
typo in main.cf.

Not here: routing and mailbox writing (``deliver``, ``mailstore``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

from . import maillog
from .dkimsig import Signer, load_signer
from .envelope import Address, Envelope, Outcome, Status, parse_path
from .errors import ConfigError, Failure, ReplyError, SpoolError, UsageError
from .message import header_fields, split_header
from .settings import Config
from .sysexits import EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, fail, run, setup_logging

PROG = "monomail deliver"
_RETURN_PATH = re.compile(rb"^Return-Path:", re.IGNORECASE)

log = logging.getLogger("monomail.mda")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=True,
                description="Deliver one message from standard input to a local user (an MDA for Postfix/Exim).")
    p.add_argument("-u", "-d", dest="user", required=True, metavar="USER", help="the local user")
    p.add_argument("-f", dest="sender", metavar="SENDER", help="envelope sender ('' for the null sender)")
    p.add_argument("-a", dest="address", metavar="ADDRESS", help="the original recipient address")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="configuration (default: $MONOMAIL_CONFIG, ./monomail.toml, /etc/monomail/monomail.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the delivery on stderr")
    return p


# -- the message ------------------------------------------------------------------------


def prepare(raw: bytes) -> tuple[bytes, str | None]:
    """(the message to store, the sender of its leading From_ line or None)."""
    data = raw.replace(b"\r\n", b"\n")
    from_sender = None
    if data.startswith(b"From "):
        end = data.find(b"\n")
        line, data = (data, b"") if end < 0 else (data[:end], data[end + 1 :])
        words = line.split()
        if len(words) > 1:
            who = words[1].decode("utf-8", "surrogateescape")
            from_sender = "" if who.upper() == "MAILER-DAEMON" else who
    return _drop_return_path(data), from_sender


def _drop_return_path(data: bytes) -> bytes:
    """The message without Return-Path fields in its header section."""
    head, body = split_header(data)
    if b"eturn-" not in head and b"ETURN-" not in head:
        return data
    kept = [f for f in header_fields(head) if not _RETURN_PATH.match(f)]
    return b"".join(kept) + data[len(head) : len(data) - len(body)] + body


# -- who and from whom --------------------------------------------------------------------


def recipient(user: str, address: str | None, config: Config) -> str:
    """``user@primary`` (or ``-a`` when it is ours and names the same user). Raises
    `Failure` (67) for a name that cannot be a local part."""
    primary = config.local.primary_domain
    try:
        parsed, params = parse_path(f"<{user}@{primary}>", smtputf8=True)
    except ReplyError as exc:
        raise Failure(EX_NOUSER, f"<{user}>: {exc.reply}") from None
    if parsed is None or params or "@" in user:
        raise Failure(EX_NOUSER, f"<{user}>: 553 5.1.3 not a user name")
    rcpt = str(Address(parsed.local, primary, parsed.quoted))
    if address:
        with contextlib.suppress(ReplyError):
            a, _ = parse_path(f"<{address.strip().strip('<>')}>", smtputf8=True)
            if a is not None and a.domain in config.local.domains and not a.quoted:
                local = a.local.lower()
                delimiters = config.local.recipient_delimiter
                cut = min((i for i in (local.find(d) for d in delimiters) if i > 0), default=-1)
                if parsed.local.lower() in (local, local[:cut] if cut > 0 else local):
                    rcpt = str(Address(a.local, a.domain))
    return rcpt


def sender_of(given: str | None, from_line: str | None) -> str:
    if given is None:
        given = from_line or ""
    text = given.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if text.upper() == "MAILER-DAEMON":
        return ""
    return re.sub(r"[\x00-\x1f\x7f]", "", text)  # it becomes a header line: no control characters


# -- delivering ---------------------------------------------------------------------------


def _signer(config: Config) -> Signer | None:
    """The DKIM keys, if this user may read them: an MTA may run ``deliver`` as a user
    who cannot (the keys are 0600); its rare remote sends (forwards) then go unsigned."""
    try:
        return load_signer(config)
    except ConfigError as exc:
        log.warning("DKIM keys not readable here, forwards leave unsigned: %s", exc)
        return None


async def _attempt(config: Config, env: Envelope, data: bytes) -> list[Outcome]:
    from .deliver import Deliverer
    from .remote import Transport
    from .tables import FileTables

    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="monomail-mda")
    transport = Transport(config)
    try:
        deliverer = Deliverer(config, executor, transport, FileTables(config.local), _signer(config))
        return await deliverer.attempt(env, data)
    finally:
        with contextlib.suppress(Exception):
            await transport.close()
        executor.shutdown(wait=True)


def _journal_spawned(config: Config, env: Envelope, data: bytes, outcomes: Sequence[Outcome]) -> int:
    """Journal the new messages deliveries made, exactly as the server does
    (``queue.journal_spawned``: a recipe's forward as the recipes left it). Returns how
    many; raises `SpoolError`."""
    from .queue import journal_spawned
    from .spool import Spool

    if not any(o.spawned for o in outcomes):
        return 0
    spool = Spool(config.server.spool_dir)
    try:
        spool.create()
    except OSError as exc:
        raise SpoolError(f"cannot create {spool.dir}: {exc}") from exc
    return len(journal_spawned(spool, env, data, outcomes))


def deliver(config: Config, user: str, sender: str | None, address: str | None, raw: bytes) -> int:
    data, from_line = prepare(raw)
    rcpt = recipient(user, address, config)
    env_sender = sender_of(sender, from_line)
    now = time.time()
    from .envelope import new_id

    env = Envelope(new_id(now), env_sender, (rcpt,), now,
                   smtputf8=not (env_sender.isascii() and rcpt.isascii()), size=len(data))
    outcomes = asyncio.run(_attempt(config, env, data))
    for o in outcomes:
        maillog.outcome(env.id, o)
    if not outcomes:
        raise Failure(EX_TEMPFAIL, f"<{rcpt}>: no delivery outcome")
    if any(o.spawned for o in outcomes if o.status is Status.DELIVERED):
        try:
            if _journal_spawned(config, env, data, outcomes):
                from .control import notify_server

                notify_server(config)
        except SpoolError as exc:
            raise Failure(EX_TEMPFAIL, f"<{rcpt}>: new message not journalled: {exc}") from None
    worst = next((o for o in outcomes if o.status is Status.TEMPORARY), None) or next(
        (o for o in outcomes if o.status is Status.PERMANENT), None)
    if worst is None:
        return EX_OK
    reason = f"<{worst.recipient}>: {worst.reply}"
    if log.isEnabledFor(logging.INFO) and worst.detail:
        reason += f" ({worst.detail})"
    if worst.status is Status.TEMPORARY:
        raise Failure(EX_TEMPFAIL, reason)
    code = EX_NOUSER if worst.reply.status.startswith("5.1.") else EX_UNAVAILABLE
    raise Failure(code, reason)


def main(argv: Sequence[str] | None = None) -> int:
    """``monomail deliver -u USER [-f SENDER] [-a ADDRESS] [-c FILE] [-v]``; a sysexits code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return fail(PROG, EX_TEMPFAIL, f"usage error: {exc} (usage: {PROG} -u USER [-f SENDER] [-a ADDRESS] [-c FILE])")
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    setup_logging(PROG, args.verbose)
    # never lose: whatever goes wrong but a refusal, the calling MTA keeps the message
    return run(PROG, lambda: _deliver_stdin(args), usage=EX_TEMPFAIL, config=EX_TEMPFAIL)


def _deliver_stdin(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config)
    try:
        raw = sys.stdin.buffer.read()
    except OSError as exc:
        raise Failure(EX_TEMPFAIL, f"cannot read the message: {exc}") from None
    return deliver(config, args.user, args.sender, args.address, raw)


if __name__ == "__main__":
    sys.exit(main())
