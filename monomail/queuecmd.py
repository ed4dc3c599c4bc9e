"""``monomail queue``: list, show, flush, hold, release, delete.

Job: the admin's hands on the spool. ``list`` and ``show`` say for each recipient not yet
delivered its state (the mail log's words: deferred, failed), attempts, the last reply,
its cause, the remote host and the next attempt; damaged entries are listed with why (in
the spool still, or moved aside into ``corrupt/`` by the server). Text from the spool
reaches the terminal with control characters escaped. ``list --json`` prints one JSON
object a line (``queuefilter.as_json``; a damaged entry is ``{"queue_id", "damaged"}``),
as Postfix's ``postqueue -j``.

``delete``, ``hold``, ``release`` and ``flush`` take queue ids and/or filters
(``queuefilter.Selection``: ``--all``, ``--sender``, ``--recipient``, ``--domain``,
``--older-than``), change every entry that matches under the spool lock, say how many
(``3 entries deleted - server (pid N) notified``), write a line per entry to the mail
log (``QUEUEID: deleted by root (monomail queue delete)``, ``logsetup.for_command``) and
wake the running server (SIGUSR1). ``delete``, ``hold`` and ``release`` with neither an
id nor a filter are a usage error (exit 2, as argparse's); ``flush`` alone still means
every entry (Postfix's ``postqueue -f``: it only makes mail due now). An id given that is
not in the queue is said on standard error and the exit status is 1; damaged entries are
left alone (counted in the message; an id given for one is an error).

Not here: which entries match (``queuefilter``), the spool's files (``spool``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import logsetup, maillog
from .config import load
from .configkeys import parse_duration
from .control import ask_showq, notify_server
from .envelope import Status
from .errors import ConfigError, CorruptEntry, SpoolError
from .maillog import printable
from .message import header_block
from .queue import listing, recipient_lines
from .queuefilter import Selection, as_json
from .record import QueueEntry
from .settings import Config
from .spool import Spool

PAST = {"delete": "deleted", "hold": "held", "release": "released", "flush": "due now"}


def _spool(args: argparse.Namespace) -> tuple[Config, Spool]:
    config = load(Path(args.config))
    return config, Spool(config.server.spool_dir)


def _signal_server(config: Config) -> str:
    """Ask a running server to re-read the spool (SIGUSR1); say what happened."""
    pid = notify_server(config)
    return f"server (pid {pid}) notified" if pid else "server not running; takes effect when it starts"


def _json_lines(spool: Spool) -> list[str]:
    out = []
    for name, got in spool.scan():
        if isinstance(got, QueueEntry):
            out.append(json.dumps(as_json(got, spool.message_size(got.id))))
        else:
            out.append(json.dumps({"queue_id": name, "damaged": str(got)}))
    out += [json.dumps({"queue_id": d.name, "damaged": d.reason, "moved_to": str(d.folder)})
            for d in spool.damaged()]
    return out


def cmd_list(args: argparse.Namespace) -> int:
    """The whole queue; for a user who cannot read the spool, as the running server lists it
    (``localsubmit``'s showq socket; not with ``--json``); with neither, one line and 69
    (EX_UNAVAILABLE)."""
    config, spool = _spool(args)
    try:
        lines = _json_lines(spool) if args.json else listing(spool, time.time())
    except SpoolError as exc:
        if not isinstance(exc.__cause__, PermissionError):
            raise
        text = None if args.json else ask_showq(config)
        if text is None:
            why = "--json reads the spool itself" if args.json else "the server is not running"
            print(f"monomail: mail system is down: {why} and the spool {spool.dir} cannot be read", file=sys.stderr)
            return 69
        sys.stdout.write(text)
        return 0
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
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


def who_asked() -> str:
    """The user running the command, and who became root with sudo (for the log)."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    sudo = os.environ.get("SUDO_USER")
    return f"{name} (sudo by {sudo})" if sudo and uid == 0 else name


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(ids=tuple(args.ids), all=args.all, sender=args.sender, recipient=args.recipient,
                     domain=args.domain, older_than=args.older_than)


def _apply(spool: Spool, sel: Selection, change: str, now: float) -> tuple[list[str], list[str], int]:
    """Under the spool lock: the ids changed, the ids given that are not there, damaged skipped."""
    touched, missing, skipped = [], [], 0
    with spool.locked():
        names = list(sel.ids) if sel.ids and not sel.filtered else spool.ids()
        for qid in names:
            try:
                entry = spool.load(qid)
            except CorruptEntry:
                if qid in sel.ids:
                    raise
                skipped += 1
                continue
            except SpoolError:
                if qid in sel.ids and not spool.exists(qid):
                    missing.append(qid)
                    continue
                raise
            if not sel.matches(entry, now):
                continue
            if change == "delete":
                spool.remove(qid)
            elif change == "flush":
                spool.update(_release(entry))
            else:
                entry = replace(entry, hold=change == "hold")
                spool.update(_release(entry) if change == "release" else entry)
            touched.append(qid)
    if sel.ids and sel.filtered:
        missing += [q for q in sel.ids if q not in touched and not spool.exists(q)]
    return touched, missing, skipped


def cmd_change(args: argparse.Namespace, change: str) -> int:
    sel = _selection(args)
    if sel.empty:
        if change != "flush":
            args.parser.error("give queue ids or a filter (--all, --sender, --recipient, --domain, --older-than)")
        sel = replace(sel, all=True)
    config, spool = _spool(args)
    touched, missing, skipped = _apply(spool, sel, change, time.time())
    for qid in missing:
        print(f"monomail: no queue entry {printable(qid)}", file=sys.stderr)
    if touched:
        logsetup.for_command(config)
        by = f"{who_asked()} (monomail queue {change})"
        for qid in touched:
            maillog.changed(qid, "made due now" if change == "flush" else PAST[change], by)
        logging.shutdown()
    count = len(touched)
    note = f" ({skipped} damaged, left alone)" if skipped else ""
    told = _signal_server(config) if touched else "nothing to tell the server"
    print(f"{count} entr{'y' if count == 1 else 'ies'} {PAST[change]}{note} -", told)
    return 1 if missing else 0


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "--older-than")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


HELP = {"flush": "retry now (the entries given; all of them when none is)",
        "delete": "remove entries without delivering them",
        "hold": "keep entries without retrying them",
        "release": "undo hold and retry now"}


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``monomail queue ...`` under the ``monomail`` command's subparsers."""
    q = sub.add_parser("queue", help="inspect and change the mail queue")
    qsub = q.add_subparsers(dest="queue_command", required=True)
    p = qsub.add_parser("list", parents=[common], help="list queued messages")
    p.add_argument("--json", action="store_true", help="one JSON object a line (as postqueue -j)")
    p.set_defaults(func=cmd_list)
    p = qsub.add_parser("show", parents=[common], help="envelope, recipient states and headers of one entry")
    p.add_argument("id")
    p.set_defaults(func=cmd_show)
    for name in ("flush", "delete", "hold", "release"):
        p = qsub.add_parser(name, parents=[common], help=HELP[name])
        p.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
        p.add_argument("--all", action="store_true", help="every entry")
        p.add_argument("--sender", metavar="ADDR", help="entries from this envelope sender (<> for bounces)")
        p.add_argument("--recipient", metavar="ADDR", help="entries with this recipient not yet delivered")
        p.add_argument("--domain", metavar="DOMAIN", help="entries with a recipient in this domain not yet delivered")
        p.add_argument("--older-than", metavar="DURATION", type=_duration,
                       help='entries received longer ago than this ("30m", "2h", "5d")')
        p.set_defaults(func=lambda a, change=name: cmd_change(a, change), parser=p)
