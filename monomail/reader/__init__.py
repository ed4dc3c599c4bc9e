"""``monomail mail``: read a local mailbox the way binmail and mailx do.

Job: list, show, delete, save and answer the messages of one mailbox, an mbox file or
a Maildir folder, and write the reader's decisions back without ever losing mail that
the server delivers meanwhile. Not here: delivering (``mailstore``), submitting a new
message (``monomail sendmail``, reached through the ``submit`` hook), MIME rendering
beyond undoing a text part's base64 or quoted-printable. Follows RFC 5322 (message
format), mbox(5) (mboxrd) and the Maildir specification.

Usage::

    monomail mail [-c CONFIG] [-u USER | -f MAILBOX] [-H | -p]

``-f MAILBOX`` reads a path: a directory holding ``cur/``, ``new/`` and ``tmp/`` is a
Maildir (https://cr.yp.to/proto/maildir.html), anything else an mbox file (mboxrd).
``-u USER`` reads the mailbox that ``[users.USER]`` of the config names; with neither,
the login name's. ``-H`` prints the header summary and exits, ``-p`` prints every
message and exits; both only read (nothing is marked or deleted; only an interrupted
rewrite found on opening is finished, see ``mboxrewrite``). Exit status: 0 done, 1 a runtime
failure (mailbox locked or changed under us, I/O error), 2 bad usage or configuration,
141 (128 + SIGPIPE, what the shell reports for mailx or less cut short by ``| head``)
the output went away: nothing more is printed, no traceback, and a session ends at once
changing nothing, as if by ``x``.

Otherwise the summary is followed by a command loop, whether or not stdin is a
terminal: ``echo 'd 1' | monomail mail -f box`` works as in mailx. The ``? `` prompt
is shown only when stdin is a terminal. End of input at the prompt is ``q``.

Commands (MSGS is one or more of ``N``, ``N-M``, ``.`` (current), ``$`` (last),
``*`` (all); it defaults to the current message)::

    p [MSGS]       print                  d [MSGS]     delete (until q)
    n, +, Enter    next message           u [MSGS]     undelete (alone: the last deleted)
    -              previous message       s [MSGS] FILE  append to an mbox FILE (or Maildir)
    N              select and print N     r [N]        reply to the sender
    h              the summary again      m ADDR...    write a new message
    q              quit, applying deletions and read marks
    x              quit, changing nothing ?            help

A message body is typed after ``r`` or ``m`` and ends at a line holding only ``.``,
or at end of input. It is handed to ``submit(sender, recipients, message_bytes)``; the
default runs ``python -m monomail sendmail -i -- ADDR...`` with the message on stdin.
If that fails the message is appended to ``$DEAD`` or ``~/dead.letter``.

Read state. Summary markers: ``N`` new, ``U`` seen in a listing before but not read,
blank: read, ``D`` deleted in this session, ``>`` the current message. How each format
stores it, and how ``q`` writes it back without losing mail delivered meanwhile (under
the very locks delivery takes, journalled against a crash): ``folders``, ``mboxrewrite``.

The package: ``messages`` (the message model, summary line and rendering), ``folders``
(mbox and Maildir: load and commit), ``compose`` (replies, new messages, submission,
dead.letter), ``session`` (the command loop) and this module (the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ..errors import ConfigError, MailboxChanged, MailboxLocked, ReaderError
from ..mboxrewrite import DEFAULT_LOCK_TIMEOUT
from .compose import Submit, compose, reply_addresses, sendmail_submit
from .folders import Folder, MaildirFolder, MboxFolder, open_folder, parse_mbox
from .messages import Message, render, summary_line
from .session import HELP, OutputClosed, Session, describe, write

__all__ = [
    "HELP", "OUTPUT_CLOSED", "Folder", "MailboxChanged", "MaildirFolder", "MboxFolder", "Message", "ReaderError",
    "Session", "Submit", "build_parser", "compose", "main", "open_folder", "parse_mbox", "render",
    "reply_addresses", "sendmail_submit", "summary_line",
]

OUTPUT_CLOSED = 128 + 13  # 128 + SIGPIPE: the status a shell shows for a program cut short by a closed pipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monomail mail",
        description="Read a local mailbox (mbox file or Maildir folder), like binmail/mailx.",
        epilog="Commands at the prompt: ? lists them.",
        add_help=False,  # -h is ours: argparse's own help swallows a write error (see _main)
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help message and exit")
    parser.add_argument("-c", "--config", help="configuration file (default: ./monomail.toml)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("-u", "--user", help="read this configured user's mailbox (default: the login name)")
    who.add_argument("-f", "--file", metavar="MAILBOX", help="read this mbox file or Maildir folder")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-H", "--headers", action="store_true", help="print the message summary and exit")
    mode.add_argument("-p", "--print", dest="print_all", action="store_true", help="print every message and exit")
    return parser


def main(argv: Sequence[str], config_path: str | None = None, *, submit: Submit | None = None,
         stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """``monomail mail``; ``argv`` are the arguments after ``mail``. ``config_path`` is the
    config used when argv has no ``-c`` (default ``monomail.toml``). Exit status: 0 ok,
    1 runtime failure (locked, changed under us, I/O), 2 bad usage or configuration,
    `OUTPUT_CLOSED` (141) the output went away (``| head``)."""
    out = stdout or sys.stdout
    inp = stdin or sys.stdin
    for stream in {out, inp} & {sys.stdout, sys.stdin}:  # a terminal's encoding must not end the session
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        return _main(argv, config_path, submit, inp, out)
    except (OutputClosed, BrokenPipeError):
        _discard_output(out)
        return OUTPUT_CLOSED


def _main(argv: Sequence[str], config_path: str | None, submit: Submit | None, inp: TextIO, out: TextIO) -> int:
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:  # a usage error, told on stderr
        return exc.code if isinstance(exc.code, int) else 2
    if args.help:
        write(out, build_parser().format_help())  # a closed pipe here is main's to answer
        return 0
    try:
        return _run(args, config_path, submit, inp, out)
    except (OutputClosed, BrokenPipeError):
        raise  # main's: nobody reads the output any more
    except ConfigError as exc:
        _complain(f"monomail: config error: {exc}")
        return 2
    except (ReaderError, MailboxLocked, OSError) as exc:
        _complain(f"monomail mail: {describe(exc)}")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        _complain(f"monomail mail: internal error: {type(exc).__name__}: {exc}")
        return 1


def _complain(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # stderr closed too: nothing left to tell
        print(text, file=sys.stderr)


def _discard_output(out: TextIO) -> None:
    """After EPIPE on stdout: point fd 1 at /dev/null, so that the interpreter's final
    flush of what is still buffered does not print "Exception ignored ... BrokenPipeError"."""
    if out is not sys.stdout:
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)


def _run(args: argparse.Namespace, config_path: str | None, submit: Submit | None, inp: TextIO, out: TextIO) -> int:
    from ..config import load

    cfg_file = args.config or config_path or "monomail.toml"
    config = None
    if args.file is None or args.config or Path(cfg_file).is_file():
        config = load(Path(cfg_file))
    login = getpass.getuser()
    fmt: str | None = None
    user_name = None
    if args.file is not None:
        path = Path(args.file).expanduser().absolute()
        if config is not None and login.lower() in config.users:
            user_name = login.lower()
    else:
        assert config is not None
        name = (args.user or login).lower()
        if name not in config.users:
            _complain(f"monomail mail: no user {name!r} in {config.path}"
                      + ("" if args.user else "; use -u USER or -f MAILBOX"))
            return 2
        user_name = name
        path, fmt = config.users[name].path, config.users[name].mailbox_format
    lock_timeout = config.local.lock_timeout if config is not None else DEFAULT_LOCK_TIMEOUT
    folder = open_folder(path, fmt, lock_timeout)
    messages = folder.load()
    if isinstance(folder, MboxFolder) and folder.recovered:
        _complain(f"monomail mail: finished an interrupted rewrite of {path}")
    if not messages:
        write(out, f"No mail in {path}\n")
        return 0
    if args.print_all:
        for i, m in enumerate(messages):
            write(out, f"Message {i + 1}:\n{render(m)}\n")
        return 0
    domain = config.local.primary_domain if config is not None else None
    from_addr = f"{user_name}@{domain}" if user_name and domain else ""
    if submit is None:
        submit = functools.partial(sendmail_submit, config=config.path if config is not None else None)
    session = Session(folder, messages, out=out, inp=inp, submit=submit, sender=from_addr or login,
                      from_addr=from_addr, domain=domain, lock_timeout=lock_timeout)
    if args.headers:
        session.headers()
        return 0
    return session.run()
