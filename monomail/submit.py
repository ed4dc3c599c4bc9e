"""``monomail sendmail``: the sendmail(8) command line, for programs that hand mail to
``/usr/sbin/sendmail`` (cron, PHP ``mail()``, git send-email, mutt, Symfony's ``-bs``).

Job: read one message on standard input, work out its envelope from the flags (and,
with ``-t``, from the To/Cc/Bcc fields), add what a local submission lacks (``From``,
``Date``, ``Message-ID``; ``Bcc`` is removed), and hand it to monomail:

- if the server is running (its PID file in ``server.spool_dir`` names a live process
  and the first ``server.listen`` address answers), over SMTP on loopback: a trusted
  client, so remote recipients relay, and the server's own checks apply;
- otherwise, or when the server answers 4xx or the session breaks, straight into the
  spool in the server's format (``queue.new_record`` + ``Spool.store``: written, fsync'd,
  renamed), with our ``Received`` field on top. The server delivers it when it starts
  (it loads the spool), or at once if it was running (it is told with SIGUSR1).

Flags (sendmail and Postfix compatible): recipients as arguments; ``-t`` adds the
recipients of To/Cc/Bcc (Resent-To/Cc/Bcc when the message has Resent- fields);
``-i``/``-oi``: a line with a single ``.`` does not end the input (without it, it
does); ``-f``/``-r`` envelope sender (``-f ''`` or ``-f '<>'``: the null sender);
``-F`` full name for a missing From; ``-bm`` (default) deliver; ``-bs`` SMTP on
stdin/stdout; ``-bp`` the queue (``monomail queue list``); ``-q`` retry now
(``monomail queue flush``); ``-v`` the SMTP dialogue and what happened, on stderr.
Accepted and ignored: ``-oX...`` (``-odi``, ``-oem``, ``-oQdir``), ``-B type``,
``-N dsn``, ``-L tag``, ``-C file``, ``-R ret``, ``-V envid``, ``-X file``,
``-O opt=value``, ``-h hops``, ``-n``, ``-m``, ``-U``, ``-G``, ``-d...``, ``-A...``.
The configuration is ``$MONOMAIL_CONFIG``, else ``./monomail.toml``, else
``/etc/monomail/monomail.toml``.

Input: bare LF, CRLF or CR line endings (CRLF on the wire, LF in the spool), 8-bit
bodies; a leading mbox ``From `` line is dropped; a line longer than 998 octets is
broken by inserting a newline and a space (as Postfix's SMTP client does), so nothing
the caller gave is refused for its length.

Exit status (sysexits.h), with a one-line reason on stderr, never a traceback:
0 sent or queued; 64 EX_USAGE bad flag, bad -f address or no recipients;
65 EX_DATAERR NUL byte or message over ``server.max_message_size``; 67 EX_NOUSER a
recipient refused permanently (the others are still sent); 69 EX_UNAVAILABLE the
message refused permanently after DATA; 70 EX_SOFTWARE internal error; 71 EX_OSERR
standard input unreadable; 73 EX_CANTCREAT / 77 EX_NOPERM / 75 EX_TEMPFAIL (disk
full) the spool cannot be written; 78 EX_CONFIG no or bad configuration.

Not here: delivery (the server), the spool's format (``spool``, ``queue``).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import logging
import os
import pwd
import re
import smtplib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .config import load_config
from .control import RunningServer, running_server, tell_server
from .envelope import Address, Envelope, new_id, parse_path
from .errors import BAD_ADDRESS, AddressError, ConfigError, ReplyError, RouteError, SpoolError
from .policy import check_recipient
from .settings import Config
from .spool import Spool, new_record
from .sysexits import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Failure,
    fail,
    setup_logging,
)
from .tables import FileTables

PROG = "monomail sendmail"
USAGE = "usage: monomail sendmail [-t] [-i] [-f sender] [-F name] [-bm|-bs|-bp] [-q] [-v] [recipient ...]"
MAX_LINE = 998  # RFC 5322 §2.1.1
STARTUP_WAIT = 3.0  # seconds to wait for a server whose process is alive but not yet listening

_HEADER = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_LONG_LINE = re.compile(rb"[^\n]{%d}" % (MAX_LINE + 1))
_WITH_VALUE = set("frFBNLCRVXOh")  # -x value or -xvalue
_ATTACHED = set("obqdAMp")  # -xrest, the rest of the word
_PLAIN = set("tivnmUG")

log = logging.getLogger("monomail.sendmail")


class UsageError(Exception):
    """A bad command line (exit 64)."""


# -- the command line -------------------------------------------------------------------


@dataclass
class Options:
    mode: str = "m"  # m: deliver, s: SMTP on stdio, p: list the queue, q: flush the queue
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    verbose: bool = False  # -v
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """sendmail's flags, getopt style (clusters such as ``-ti``; options end at the first
    word that is not one, or at ``--``). Raises `UsageError`."""
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        j = 1
        while j < len(word):
            ch, rest = word[j], word[j + 1 :]
            if ch in _PLAIN:
                _flag(opts, ch)
                j += 1
                continue
            if ch in _WITH_VALUE:
                if rest:
                    value = rest
                else:
                    i += 1
                    if i >= len(args):
                        raise UsageError(f"option -{ch} requires an argument")
                    value = args[i]
                _valued(opts, ch, value)
            elif ch in _ATTACHED:
                _attached(opts, ch, rest)
            else:
                raise UsageError(f"unknown option -{ch}")
            break
        i += 1
    opts.recipients = args[i:]
    return opts


def _flag(opts: Options, ch: str) -> None:
    if ch == "t":
        opts.extract = True
    elif ch == "i":
        opts.ignore_dots = True
    elif ch == "v":
        opts.verbose = True
    # -n (no aliasing), -m (me too), -U (initial submission), -G (gateway): ignored


def _valued(opts: Options, ch: str, value: str) -> None:
    if ch in "fr":
        opts.sender = value
    elif ch == "F":
        opts.full_name = value
    # -B body type, -N dsn, -L tag, -C config, -R ret, -V envid, -X log, -O opt, -h hops: ignored


def _attached(opts: Options, ch: str, rest: str) -> None:
    if ch == "o":
        if not rest:
            raise UsageError("option -o requires a value (such as -oi)")
        if rest == "i":
            opts.ignore_dots = True
        # -oem, -oep, -odi, -odb, -odq, -oQdir, any other -oX...: ignored
    elif ch == "b":
        if rest in ("m", "s", "p"):
            opts.mode = rest
        elif rest in ("i", "I"):
            raise UsageError("-bi is not supported: monomail reads its aliases from monomail.toml")
        elif rest in ("d", "D"):
            raise UsageError(f"-b{rest} is not supported: run 'monomail serve'")
        elif rest in ("t", "v"):
            raise UsageError(f"-b{rest} is not supported: use 'monomail route ADDRESS'")
        else:
            raise UsageError(f"unknown mode -b{rest}")
    elif ch == "q":
        opts.mode = "q"  # -q, -q30m, -qR..., -qI...: retry the whole queue now
    # -d (debug), -A (submit/MTA), -M (macro), -p (protocol): ignored


# -- configuration ----------------------------------------------------------------------


# -- the message ------------------------------------------------------------------------


def read_message(stream: BinaryIO, ignore_dots: bool) -> bytes:
    """Standard input up to EOF, or (without -i) up to a line holding a single '.'."""
    if ignore_dots:
        return stream.read()
    lines = []
    for line in iter(stream.readline, b""):
        if line in (b".\n", b".\r\n", b"."):
            break
        lines.append(line)
    return b"".join(lines)


def normalize(data: bytes) -> bytes:
    """CRLF, CR or LF line endings → LF; a final newline; a leading mbox From_ line dropped."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if data.startswith(b"From "):
        end = data.find(b"\n")
        data = b"" if end < 0 else data[end + 1 :]
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, each with its continuation lines; body) of an LF message. The
    header section ends at an empty line (consumed) or at the first line that is no
    header field (it starts the body)."""
    fields: list[bytes] = []
    pos, size = 0, len(data)
    while pos < size:
        end = data.find(b"\n", pos)
        stop = size if end < 0 else end + 1
        line = data[pos:stop]
        if line == b"\n":
            return fields, data[stop:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _HEADER.match(line):
            fields.append(line)
        else:
            break
        pos = stop
    return fields, data[pos:]


def _name(header_field: bytes) -> str:
    return header_field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def _value(header_field: bytes) -> str:
    raw = header_field.split(b":", 1)[1]
    return raw.decode("utf-8", "replace").replace("\n", "")


def header_recipients(fields: Sequence[bytes]) -> list[str]:
    """Addresses of To/Cc/Bcc, or of Resent-To/Cc/Bcc when the message was resent (-t)."""
    names = {_name(f) for f in fields}
    wanted = ({"resent-to", "resent-cc", "resent-bcc"} if names & {"resent-to", "resent-cc", "resent-bcc"}
              else {"to", "cc", "bcc"})
    values = [_value(f) for f in fields if _name(f) in wanted]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def wrap_long_lines(data: bytes) -> bytes:
    """Break lines over 998 octets by inserting LF + space (never inside a UTF-8 character)."""
    if len(data) <= MAX_LINE or not _LONG_LINE.search(data):
        return data
    out = []
    for line in data.split(b"\n"):
        while len(line) > MAX_LINE:
            cut = MAX_LINE
            while cut > MAX_LINE - 4 and 0x80 <= line[cut] < 0xC0:
                cut -= 1
            out.append(line[:cut])
            line = b" " + line[cut:]
        out.append(line)
    return b"\n".join(out)


@dataclass(frozen=True)
class Prepared:
    data: bytes  # LF line endings, headers completed, Bcc removed
    recipients: tuple[str, ...]  # from the header fields (when asked for)


def prepare(raw: bytes, *, from_address: str, full_name: str, hostname: str, extract: bool,
            now: float | None = None) -> Prepared:
    """The message as it is submitted: Bcc/Resent-Bcc removed, From/Date/Message-ID added
    when missing, long lines broken. ``raw`` is already `normalize`d."""
    fields, body = split_message(raw)
    found = header_recipients(fields) if extract else []
    kept = [f for f in fields if _name(f) not in ("bcc", "resent-bcc")]
    names = {_name(f) for f in kept}
    added = []
    if "from" not in names:
        added.append(b"From: " + _from_value(full_name, from_address).encode("utf-8") + b"\n")
    if "date" not in names:
        added.append(f"Date: {email.utils.formatdate(now, localtime=True)}\n".encode())
    if "message-id" not in names:
        added.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}\n".encode())
    data = b"".join(kept) + b"".join(added) + b"\n" + body
    return Prepared(wrap_long_lines(data), tuple(found))


def _from_value(name: str, address: str) -> str:
    name = " ".join(name.split())  # one line, whatever -F or the GECOS field held
    if not name:
        return address
    try:
        return email.utils.formataddr((name, address))
    except UnicodeError:  # a non-ASCII address: no display name then
        return address


def received_field(hostname: str, uid: int, when: float, queue_id: str | None = None) -> bytes:
    """Our trace field for a local submission (RFC 5321 §4.4)."""
    text = f"Received: by {hostname} (monomail sendmail, from userid {uid})"
    if queue_id:
        text += f"\n\twith local id {queue_id}"
    return f"{text}; {email.utils.formatdate(when, localtime=True)}\n".encode()


# -- addresses --------------------------------------------------------------------------


def canonical(address: str, primary_domain: str) -> str:
    """One address as monomail writes it (``local@domain``, domain lower-case; a bare
    local part gets the primary domain). Raises `AddressError` (with its reply)."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    parsed, params = parse_path(f"<{text}>", smtputf8=True)
    if parsed is None or params:
        raise AddressError(BAD_ADDRESS, f"bad address {address!r}")
    return str(Address(parsed.local, parsed.domain or primary_domain, parsed.quoted))


def argument_addresses(arg: str) -> list[str]:
    """The addresses in one command-line argument: one plain address, or a list in
    header syntax (``a@x, B <b@y>``)."""
    if not any(c in arg for c in ',<("'):
        return [arg.strip()] if arg.strip() else []
    return [addr for _, addr in email.utils.getaddresses([arg]) if addr]


def _login() -> tuple[str, str]:
    """The caller's login name and full name (the GECOS field's first part)."""
    try:
        pw = pwd.getpwuid(os.getuid())
    except KeyError:
        return os.environ.get("LOGNAME") or os.environ.get("USER") or f"uid{os.getuid()}", ""
    return pw.pw_name, pw.pw_gecos.split(",", 1)[0].strip()


def envelope_sender(given: str | None, login: str, primary_domain: str) -> str:
    """``-f`` as given (``''``/``<>``: the null sender), else login@primary_domain."""
    if given is None:
        try:
            return canonical(login, primary_domain)
        except ReplyError:
            return f"nobody@{primary_domain}"
    if given.strip() in ("", "<>"):
        return ""
    try:
        return canonical(given, primary_domain)
    except ReplyError as exc:
        raise UsageError(f"bad sender address {given!r}: {exc.reply}") from None


# -- handing it over --------------------------------------------------------------------


@dataclass
class Result:
    sent: list[str] = field(default_factory=list)  # taken by the running server
    queued: list[str] = field(default_factory=list)  # written to the spool
    queue_id: str = ""
    server_reply: str = ""
    refused: dict[str, str] = field(default_factory=dict)  # recipient → permanent reply


def _reply_text(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(text.split())}"


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _connect(server: RunningServer, config: Config) -> smtplib.SMTP:
    """An SMTP session with the server; waits briefly for one that is starting up."""
    timeout = config.remote.cut_through + 30
    deadline = time.monotonic() + STARTUP_WAIT
    while True:
        try:
            return smtplib.SMTP(server.host, server.port, local_hostname=config.hostname, timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def submit_smtp(server: RunningServer, config: Config, sender: str, recipients: Sequence[str], data: bytes,
                result: Result, verbose: bool = False) -> list[str]:
    """Send over SMTP; fills ``result`` and returns the recipients to spool instead
    (those deferred with 4xx, and all unfinished ones when the session breaks)."""
    wire = data.replace(b"\n", b"\r\n")
    eight_bit = not data.isascii()
    utf8 = not sender.isascii() or any(not r.isascii() for r in recipients)
    todo = list(recipients)
    deferred: list[str] = []
    try:
        client = _connect(server, config)
    except (OSError, smtplib.SMTPException) as exc:
        log.info("server at %s:%d not reachable: %s", server.host, server.port, exc)
        return todo
    server.connected = True
    try:
        with client:
            if verbose:
                client.set_debuglevel(1)
            code, text = client.ehlo()
            if code != 250:
                return todo
            options = []
            if eight_bit and client.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if utf8 and client.has_extn("smtputf8"):
                options.append("SMTPUTF8")
            for chunk in _chunks(list(recipients), config.server.max_recipients):
                code, text = client.mail(sender, options)
                if code >= 400:
                    if code >= 500:
                        for r in chunk:
                            result.refused[r] = _reply_text(code, text)
                    else:
                        deferred += chunk
                    _done(todo, chunk)
                    client.rset()
                    continue
                accepted = []
                for r in chunk:
                    code, text = client.rcpt(r)
                    if code < 300:
                        accepted.append(r)
                        continue
                    if code >= 500:
                        result.refused[r] = _reply_text(code, text)
                    else:
                        deferred.append(r)
                    _done(todo, [r])
                if not accepted:
                    client.rset()
                    continue
                try:
                    code, text = client.data(wire)
                except smtplib.SMTPDataError as exc:
                    code, text = exc.smtp_code, exc.smtp_error
                reply = _reply_text(code, text)
                if code < 300:
                    result.sent += accepted
                    result.server_reply = reply
                elif code >= 500:
                    for r in accepted:
                        result.refused[r] = reply
                else:
                    deferred += accepted
                _done(todo, accepted)
    except Exception as exc:  # a broken session: whatever is unfinished goes to the spool
        log.info("SMTP session with %s:%d failed: %r", server.host, server.port, exc)
    return deferred + todo


def _done(todo: list[str], finished: Sequence[str]) -> None:
    for r in finished:
        with contextlib.suppress(ValueError):
            todo.remove(r)


def submit_spool(config: Config, sender: str, recipients: Sequence[str], data: bytes, result: Result,
                 uid: int) -> None:
    """Journal the message for ``recipients`` in the spool (refusing unknown local users
    now, as the server would at RCPT time). Raises `Failure` when it cannot be written."""
    tables = FileTables()
    ok = []
    for r in recipients:
        try:
            check_recipient(Address.from_str(r), config, trusted=True, sender=sender, tables=tables)
        except RouteError as exc:
            result.refused[r] = str(exc.reply)
            continue
        except Exception as exc:  # the server decides at delivery time
            log.info("cannot check <%s> now: %r", r, exc)
        ok.append(r)
    if not ok:
        return
    now = time.time()
    qid = new_id(now)
    body = received_field(config.hostname, uid, now, qid) + data
    utf8 = not sender.isascii() or any(not r.isascii() for r in ok)
    env = Envelope(qid, sender, tuple(ok), now, utf8, len(body))
    spool = Spool(config.server.spool_dir)
    try:
        spool.create()
        spool.store(new_record(env, now), body)
    except (OSError, SpoolError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        err = cause.errno if isinstance(cause, OSError) else None
        if err in (errno.EACCES, errno.EPERM):
            code = EX_NOPERM
        elif err in (errno.ENOSPC, errno.EDQUOT):
            code = EX_TEMPFAIL
        else:
            code = EX_CANTCREAT
        raise Failure(code, f"cannot write to the spool {spool.dir}: {cause or exc}") from None
    result.queued += ok
    result.queue_id = qid


def submit(config: Config, sender: str, recipients: Sequence[str], data: bytes, *, uid: int,
           verbose: bool = False) -> Result:
    """Hand a prepared (LF) message to the running server, or to the spool."""
    result = Result()
    server = running_server(config)
    todo = list(recipients)
    if server is not None:
        traced = received_field(config.hostname, uid, time.time()) + data
        todo = submit_smtp(server, config, sender, todo, traced, result, verbose)
    if todo:
        submit_spool(config, sender, todo, data, result, uid)
        if result.queued:
            tell_server(server)
    return result


def exit_code(refused: dict[str, str]) -> int:
    """67 when a recipient itself was refused (5.1.x, or 550/551/553 without a status),
    69 when the message was."""
    for reply in refused.values():
        words = reply.split()
        status = words[1] if len(words) > 1 and re.fullmatch(r"[245]\.\d+\.\d+", words[1]) else ""
        if status.startswith("5.1.") or (not status and words[:1] in (["550"], ["551"], ["553"])):
            return EX_NOUSER
    return EX_UNAVAILABLE


def _describe(refused: dict[str, str]) -> str:
    return "; ".join(f"<{r}>: {reply}" for r, reply in refused.items())


# -- modes ------------------------------------------------------------------------------


def deliver_mode(opts: Options, config: Config, stdin: BinaryIO) -> int:
    primary = config.local.primary_domain
    login, gecos = _login()
    sender = envelope_sender(opts.sender, login, primary)
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
    prepared = prepare(normalize(raw), from_address=sender or envelope_sender(None, login, primary),
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
        raise Failure(exit_code(refused), f"recipient refused: {_describe(refused)}")
    return EX_OK


class StdioSMTP:
    """``-bs``: a small SMTP server (RFC 5321) on standard input and output, as Postfix's
    sendmail runs smtpd there. Recipients are checked at RCPT time with the server's own
    policy (unknown users 550 5.1.1); after DATA the message goes the usual way (the
    running server, else the spool) and the reply says how that went. Lines may end in
    CRLF or a bare LF. The exit status is 0 unless the session itself failed."""

    MAX_COMMAND = 4096

    def __init__(self, config: Config, opts: Options, rfile: BinaryIO, wfile: BinaryIO) -> None:
        self.config = config
        self.opts = opts
        self.rfile = rfile
        self.wfile = wfile
        self.tables = FileTables()
        self.login, self.gecos = _login()
        self.reset()

    def reset(self) -> None:
        self.sender: str | None = None
        self.smtputf8 = False
        self.recipients: list[str] = []

    def reply(self, *lines: str) -> None:
        out = [f"{line[:3]}-{line[4:]}" for line in lines[:-1]] + [lines[-1]]
        self.wfile.write("".join(f"{line}\r\n" for line in out).encode("utf-8", "replace"))
        self.wfile.flush()

    def readline(self) -> bytes | None:
        line = self.rfile.readline(self.MAX_COMMAND)
        if not line:
            return None
        if not line.endswith(b"\n") and len(line) >= self.MAX_COMMAND:
            while (more := self.rfile.readline(self.MAX_COMMAND)) and not more.endswith(b"\n"):
                pass
            return b"\0"  # marks an over-long line
        return line.rstrip(b"\r\n")

    def run(self) -> int:
        host = self.config.hostname
        self.reply(f"220 {host} ESMTP monomail sendmail")
        while (line := self.readline()) is not None:
            if line == b"\0":
                self.reply("500 5.5.2 Line too long")
                continue
            text = line.decode("utf-8", "replace")
            verb, _, arg = text.partition(" ")
            verb, arg = verb.upper(), arg.strip()
            if verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return EX_OK
            handler = getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
            if handler is None:
                self.reply("502 5.5.1 Command not implemented" if verb in ("STARTTLS", "AUTH", "BDAT", "ETRN")
                           else "500 5.5.2 Command not recognized")
                continue
            if handler(arg) is False:
                return EX_OK
        return EX_OK

    def smtp_EHLO(self, arg: str) -> None:
        self.reset()
        self.reply(f"250 {self.config.hostname}", "250 8BITMIME", "250 SMTPUTF8", "250 PIPELINING",
                   f"250 SIZE {self.config.server.max_message_size}", "250 ENHANCEDSTATUSCODES")

    def smtp_HELO(self, arg: str) -> None:
        self.reset()
        self.reply(f"250 {self.config.hostname}")

    def smtp_NOOP(self, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    def smtp_RSET(self, arg: str) -> None:
        self.reset()
        self.reply("250 2.0.0 Ok")

    def smtp_VRFY(self, arg: str) -> None:
        self.reply("252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery")

    def smtp_HELP(self, arg: str) -> None:
        self.reply("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY QUIT")

    def smtp_MAIL(self, arg: str) -> None:
        if self.sender is not None:
            return self.reply("503 5.5.1 Sender already given")
        if arg[:5].upper() != "FROM:":
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        try:
            address, params = parse_path(arg[5:], smtputf8=False)
        except AddressError as exc:
            return self.reply(str(exc.reply))
        for key, value in params.items():
            if key == "SIZE" and (value or "").isdigit():
                if int(value or 0) > self.config.server.max_message_size:
                    return self.reply("552 5.3.4 Message size exceeds fixed maximum message size")
            elif key == "BODY" and (value or "").upper() in ("7BIT", "8BITMIME"):
                pass
            elif not (key == "SMTPUTF8" and value is None):
                return self.reply("555 5.5.4 Parameter not recognized")
        self.sender = str(address) if address else ""
        self.smtputf8 = "SMTPUTF8" in params
        self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            return self.reply("503 5.5.1 Need MAIL command first")
        if arg[:3].upper() != "TO:":
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
        cfg = self.config
        try:
            address, params = parse_path(arg[3:], smtputf8=self.smtputf8)
            if address is None:
                return self.reply("501 5.1.3 Null recipient not allowed")
            if params:
                return self.reply("555 5.5.4 Parameter not recognized")
            if len(self.recipients) >= cfg.server.max_recipients:
                return self.reply("452 4.5.3 Too many recipients")
            address = Address(address.local, address.domain or cfg.local.primary_domain, address.quoted)
            check_recipient(address, cfg, trusted=True, sender=self.sender, tables=self.tables)
        except ReplyError as exc:
            return self.reply(str(exc.reply))
        except Exception as exc:  # the server decides at delivery time
            log.info("cannot check %s now: %r", arg[3:], exc)
        rcpt = str(address)
        if rcpt not in self.recipients:
            self.recipients.append(rcpt)
        self.reply("250 2.1.5 Ok")

    def smtp_DATA(self, arg: str) -> bool | None:
        if not self.recipients:
            return self.reply("503 5.5.1 Need RCPT command first")
        if arg:
            return self.reply("501 5.5.4 Syntax: DATA")
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        lines: list[bytes] = []
        size = 0
        limit = self.config.server.max_message_size
        while True:
            line = self.rfile.readline()
            if not line:
                return False  # the client went away: nothing was accepted
            stripped = line.rstrip(b"\r\n")
            if stripped == b".":
                break
            if stripped.startswith(b"."):
                stripped = stripped[1:]
            size += len(stripped) + 1
            if size <= limit:
                lines.append(stripped + b"\n")
        sender, recipients = self.sender or "", self.recipients
        self.reset()
        if size > limit:
            return self.reply("552 5.3.4 Message size exceeds fixed maximum message size")
        raw = b"".join(lines)
        if b"\x00" in raw:
            return self.reply("554 5.6.0 Message contains a NUL byte")
        primary = self.config.local.primary_domain
        prepared = prepare(normalize(raw), from_address=sender or envelope_sender(None, self.login, primary),
                           full_name=self.gecos if self.opts.full_name is None else self.opts.full_name,
                           hostname=self.config.hostname, extract=False)
        try:
            result = submit(self.config, sender, recipients, prepared.data, uid=os.getuid(),
                            verbose=False)
        except Failure as exc:
            code = "452 4.3.1" if exc.code == EX_TEMPFAIL else "451 4.3.0"
            return self.reply(f"{code} Local error: message not accepted, try again later")
        done = len(result.sent) + len(result.queued)
        if not done:
            first = next(iter(result.refused.values()), "554 5.0.0 Transaction failed")
            return self.reply(first if first[:1] == "5" else "554 5.0.0 Transaction failed")
        how = f"queued as {result.queue_id}" if result.queued else "sent"
        if result.refused:
            how += "; refused: " + _describe(result.refused)
        return self.reply(f"250 2.0.0 Ok: {how}")


def _cli(config: Config, *words: str) -> int:
    from .cli import main as cli_main

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
    setup_logging(PROG, opts.verbose)
    try:
        config = load_config()
        if opts.mode == "p":
            return _cli(config, "queue", "list")
        if opts.mode == "q":
            return _cli(config, "queue", "flush")
        if opts.mode == "s":
            return StdioSMTP(config, opts, sys.stdin.buffer, sys.stdout.buffer).run()
        return deliver_mode(opts, config, sys.stdin.buffer)
    except UsageError as exc:
        return fail(PROG, EX_USAGE, str(exc))
    except ConfigError as exc:
        return fail(PROG, EX_CONFIG, f"config error: {exc}")
    except Failure as exc:
        return fail(PROG, exc.code, exc.message)
    except KeyboardInterrupt:
        return fail(PROG, EX_TEMPFAIL, "interrupted; nothing was sent")
    except Exception as exc:  # never a traceback
        return fail(PROG, EX_SOFTWARE, f"internal error: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
