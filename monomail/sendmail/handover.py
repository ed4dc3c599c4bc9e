"""Handing a submitted message to monomail: the running server's local socket, else the
drop folder (or, for the spool's own user, the spool).

Job: if the server is running (its state file ``<spool>/public/monomail.pid``, readable
by every user, names a live process and its local SMTP socket), send over that socket:
the server knows the caller by the socket's peer credentials, trusts it to relay, and
applies its own checks (the sender rule among them). Otherwise, or for the recipients
the server deferred (4xx) or when the session breaks: the caller that owns the spool
(the server's own user, or whoever runs a private monomail) journals the message with
``Spool.journal_new`` (the one way to journal a new message: written, fsync'd, renamed)
with our Received field on top, and wakes the server (SIGUSR1, ``control``); anyone
else leaves it in the drop folder (``maildrop.deposit``), which the server reads at
start and every few seconds. Unknown local users are refused now, as the server would
at RCPT time.

Error handling: a spool or drop folder that cannot be written, for any reason, is a
`Failure` with ``EX_TEMPFAIL`` (75: the caller keeps the message and tries again), its
cause chained; an error while checking a recipient that nobody classified leaves the
decision to the server at delivery time.

Not here: the message itself (``compose``), exit codes of the command (``monomail.sendmail``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import smtplib
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..control import RunningServer, maildrop_dir, tell_server
from ..envelope import Address, new_id
from ..errors import Failure, RouteError, SpoolError
from ..maildrop import deposit
from ..policy import check_recipient
from ..record import parse_reply
from ..router import Tables
from ..settings import Config
from ..spool import Spool
from ..sysexits import EX_NOUSER, EX_TEMPFAIL, EX_UNAVAILABLE
from ..tables import FileTables
from .compose import received_field

log = logging.getLogger("monomail.sendmail")


@dataclass
class Result:
    sent: list[str] = field(default_factory=list)  # taken by the running server
    queued: list[str] = field(default_factory=list)  # written to the spool
    queue_id: str = ""
    dropped: bool = False  # ``queued`` went into the drop folder
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
    """An SMTP session with the server on its local socket (greeted). Raises OSError or
    ``smtplib.SMTPException``."""
    assert server.socket is not None
    timeout = config.remote.cut_through + 30
    client = smtplib.SMTP(local_hostname=config.hostname, timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(server.socket))
    except OSError:
        sock.close()
        raise
    client.sock = sock
    code, text = client.getreply()
    if code != 220:
        client.close()
        raise smtplib.SMTPConnectError(code, text)
    return client


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
        log.info("server at %s not reachable: %s", server.socket, exc)
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
        log.info("SMTP session with %s failed: %r", server.socket, exc)
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


def _known(config: Config, sender: str, recipients: Sequence[str], result: Result) -> list[str]:
    """The recipients the server would take at RCPT time; the others into ``result.refused``."""
    tables = FileTables(config.local)
    ok = []
    for r in recipients:
        try:
            check_local(config, tables, Address.from_str(r), sender)
        except RouteError as exc:
            result.refused[r] = str(exc.reply)
            continue
        ok.append(r)
    return ok


def submit_spool(config: Config, sender: str, recipients: Sequence[str], data: bytes, result: Result,
                 uid: int) -> None:
    """Journal the message for ``recipients`` in the spool (refusing unknown local users
    now, as the server would at RCPT time). Raises `Failure` (75) when it cannot be written."""
    ok = _known(config, sender, recipients, result)
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


def submit_drop(config: Config, sender: str, recipients: Sequence[str], data: bytes, result: Result) -> None:
    """Leave the message for ``recipients`` in the drop folder (refusing unknown local users
    now). Raises `Failure` (75) when it cannot be written."""
    ok = _known(config, sender, recipients, result)
    if not ok:
        return
    folder = maildrop_dir(config)
    try:
        deposit(folder, sender, ok, data)
    except OSError as exc:  # whatever the reason: try again later
        raise Failure(EX_TEMPFAIL, f"cannot write to the drop folder {folder}: {exc} "
                                   "(is monomail installed and started once?)") from exc
    result.queued += ok
    result.dropped = True


def owns_spool(config: Config) -> bool:
    """Is the caller the spool's own user (who may write its entries)? A spool not made yet
    is the caller's when it could make it."""
    path = config.server.spool_dir
    try:
        return os.stat(path).st_uid == os.geteuid()
    except FileNotFoundError:
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        return os.access(parent, os.W_OK)
    except OSError:
        return False


def server_uid(config: Config, server: RunningServer | None) -> int | None:
    """The uid the server runs as: the state file's word, else ``server.user``'s."""
    if server is not None and server.uid is not None:
        return server.uid
    try:
        return pwd.getpwnam(config.server.user).pw_uid if config.server.user else None
    except (KeyError, OSError):
        return None


def submit(config: Config, sender: str, recipients: Sequence[str], data: bytes, *, uid: int,
           server: RunningServer | None, verbose: bool = False) -> Result:
    """Hand a prepared (LF) message to the running server, else the spool or the drop folder."""
    result = Result()
    todo = list(recipients)
    if server is not None and server.socket is not None:
        todo = submit_smtp(server, config, sender, todo, data, result, verbose)
    if todo:
        if owns_spool(config):
            submit_spool(config, sender, todo, data, result, uid)
            if result.queued:
                tell_server(server)
        else:
            submit_drop(config, sender, todo, data, result)
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
