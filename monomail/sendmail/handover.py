"""Handing a submitted message to monomail: the running server over SMTP, else the spool.

Job: if the server is running (its PID file in ``server.spool_dir`` names a live process
and the first ``server.listen`` address answers), send over SMTP on loopback: a trusted
client, so remote recipients relay, and the server's own checks apply. Otherwise, or
for the recipients the server deferred (4xx) or when the session breaks, journal the
message with ``Spool.journal_new`` (the one way to journal a new message: written,
fsync'd, renamed), with our Received field on top; the server delivers it when it
starts, or at once if it was running (it is told with SIGUSR1, ``control``). Unknown
local users are refused now, as the server would at RCPT time.

Error handling: the spool that cannot be written, for any reason, is a `Failure` with
``EX_TEMPFAIL`` (75: the caller keeps the message and tries again), its cause chained;
an error while checking a recipient that nobody classified leaves the decision to the
server at delivery time.

Not here: the message itself (``compose``), exit codes of the command (``monomail.sendmail``).
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..control import RunningServer, running_server, tell_server
from ..envelope import Address, new_id
from ..errors import Failure, RouteError, SpoolError
from ..policy import check_recipient
from ..record import parse_reply
from ..router import Tables
from ..settings import Config
from ..spool import Spool
from ..sysexits import EX_NOUSER, EX_TEMPFAIL, EX_UNAVAILABLE
from ..tables import FileTables
from .compose import received_field

STARTUP_WAIT = 3.0  # seconds to wait for a server whose process is alive but not yet listening

log = logging.getLogger("monomail.sendmail")


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
    text: bytes | str
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


def check_local(config: Config, tables: Tables, address: Address, sender: str) -> None:
    """The server's recipient policy for a local (trusted) submission: `RouteError` to
    refuse; an error nobody classified leaves the decision to the server at delivery time."""
    try:
        check_recipient(address, config, trusted=True, sender=sender, tables=tables)
    except RouteError:
        raise
    except Exception as exc:
        log.info("cannot check <%s> now: %r", address, exc)


def submit_spool(config: Config, sender: str, recipients: Sequence[str], data: bytes, result: Result,
                 uid: int) -> None:
    """Journal the message for ``recipients`` in the spool (refusing unknown local users
    now, as the server would at RCPT time). Raises `Failure` (75) when it cannot be written."""
    tables = FileTables(config.local)
    ok = []
    for r in recipients:
        try:
            check_local(config, tables, Address.from_str(r), sender)
        except RouteError as exc:
            result.refused[r] = str(exc.reply)
            continue
        ok.append(r)
    if not ok:
        return
    now = time.time()
    qid = new_id(now)
    spool = Spool(config.server.spool_dir)
    try:
        spool.create()
        env = spool.journal_new(sender, ok, received_field(config.hostname, uid, now, qid) + data, now=now, qid=qid)
    except (OSError, SpoolError) as exc:  # whatever the reason: try again later
        cause = exc.__cause__ if isinstance(exc, SpoolError) and exc.__cause__ else exc
        raise Failure(EX_TEMPFAIL, f"cannot write to the spool {spool.dir}: {cause}") from cause
    result.queued += ok
    result.queue_id = env.id


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
    for reply in map(parse_reply, refused.values()):
        if reply.status.startswith("5.1.") or (not reply.status and reply.code in (550, 551, 553)):
            return EX_NOUSER
    return EX_UNAVAILABLE


def describe(refused: dict[str, str]) -> str:
    return "; ".join(f"<{r}>: {reply}" for r, reply in refused.items())
