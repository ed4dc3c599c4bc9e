"""The AUTH exchange of a session (RFC 4954): PLAIN and LOGIN, read, decoded and checked.

Job: the part of `session.Session` that runs one AUTH command once the transaction core
(``transaction``) has asked for it: the PLAIN exchange (RFC 4616: the authorization
identity kept, and refused unless it is the user itself; ``=`` is the empty initial
response) and LOGIN (``Username:``, ``Password:``), each 334 round read with the
session's own line reader (an over-long line: 500 5.5.6; ``*`` cancels: 501 5.7.0; not
base64: 501 5.5.2), the whole exchange under ``server.command_timeout``, the credentials
checked by the ``auth`` backend off the event loop, failures counted per client
(``limits.FailureWindow``; past the limit 421 4.7.0 and close) and logged on the line
fail2ban reads (``auth failed client=[ip] user=name session=ID mechanism=M``).

A mixin: `session.Session` provides the attributes declared here, `read_line` and `_write`.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from base64 import b64decode, b64encode

from .. import maillog
from ..auth import Authenticator
from ..errors import AuthUnavailable, Reply
from ..settings import Config
from ..transaction import AUTH_INVALID, Next, Step, Transaction
from .host import Host

log = logging.getLogger("monomail.smtp")

AUTH_BLOCKED = Reply(421, "4.7.0", "Too many authentication failures, try again later")
COMMAND_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for a command, closing connection")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
BAD_BASE64 = Reply(501, "5.5.2", "Can't decode base64")
BAD_PLAIN = Reply(501, "5.5.2", "Can't split auth value")
USERNAME, PASSWORD = b"Username:", b"Password:"  # LOGIN's challenges, as clients expect them


class TooLong(Exception):
    """An AUTH response line longer than the line limit (skipped to its end)."""


class Refused(Exception):
    """The exchange ended with a reply (cancelled, not base64, malformed)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self.reply = reply


class AuthExchange:
    """AUTH for a session; the attributes below are the session's."""

    __slots__ = ()

    mm: Host
    cfg: Config
    auth: Authenticator
    core: Transaction | None
    peer_ip: str
    client: str
    session_id: str

    async def read_line(self) -> bytes | None:
        """One line from the client; None when it was too long (the session's reader)."""
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    async def _challenge(self, challenge: bytes) -> bytes:
        """One 334 round: the decoded response."""
        self._write(b"334 " + b64encode(challenge) + b"\r\n")
        line = await self.read_line()
        if line is None:
            raise TooLong
        blob = line.strip()
        if blob == b"*":
            raise Refused(AUTH_CANCELLED)
        return _decode(blob)

    async def _plain(self, initial: str | None) -> tuple[bytes, bytes, bytes]:
        """PLAIN (RFC 4616): authzid, user, password."""
        blob = await self._challenge(b"") if initial is None else b"" if initial == "=" else _decode(initial)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            raise Refused(BAD_PLAIN)
        return parts[0], parts[1], parts[2]

    async def _login(self, initial: str | None) -> tuple[bytes, bytes, bytes]:
        """LOGIN: no authzid, user, password."""
        user = await self._challenge(USERNAME) if initial is None else _decode(initial)
        return b"", user, await self._challenge(PASSWORD)

    async def _auth(self) -> None:
        """The exchange for the core's ``auth_request``, its reply written."""
        core = self.core
        assert core is not None
        step = await self._auth_step(core)
        self._write(step.wire)
        if step.next is Next.CLOSE:
            self.hang_up()

    def hang_up(self) -> None:
        raise NotImplementedError

    async def _auth_step(self, core: Transaction) -> Step:
        request = core.auth_request
        assert request is not None
        mechanism, initial = request
        failures = self.mm.failures
        if failures.blocked(self.client):
            log.warning("auth blocked client=[%s]: too many failures", self.peer_ip)
            return Step((AUTH_BLOCKED,), Next.CLOSE)
        exchange = self._plain if mechanism == "PLAIN" else self._login
        try:
            async with asyncio.timeout(self.cfg.server.command_timeout):
                authzid_bytes, user_bytes, password = await exchange(initial)
        except TimeoutError:
            return Step((COMMAND_TIMEOUT,), Next.CLOSE)
        except TooLong:
            return core.answer(AUTH_LINE_TOO_LONG)
        except Refused as exc:
            return core.answer(exc.reply)
        authzid = authzid_bytes.decode("utf-8", "replace")
        user = user_bytes.decode("utf-8", "replace")
        try:
            login = await self.auth.check(user, password, client_ip=self.peer_ip)
        except AuthUnavailable as exc:
            log.error("auth unavailable client=[%s] user=%s: %s", self.peer_ip, maillog.printable(user),
                      maillog.printable(exc.detail))
            return core.answer(exc.reply)
        if login is not None and authzid and authzid.lower() not in (user.lower(), login.lower()):
            log.warning("auth refused client=[%s] user=%s authzid=%s: may not act as another user",
                        self.peer_ip, maillog.printable(login), maillog.printable(authzid))
            login = None  # RFC 4616 §2: a user acts only as itself here
        if login is None:
            failures.fail(self.client)
            log.warning("auth failed client=[%s] user=%s session=%s mechanism=%s", self.peer_ip,  # (fail2ban's line)
                        maillog.printable(user), self.session_id, mechanism)
            return core.answer(AUTH_INVALID)
        log.info("auth ok client=[%s] user=%s mechanism=%s", self.peer_ip, maillog.printable(login), mechanism)
        return core.authenticated(login)


def _decode(blob: str | bytes) -> bytes:
    try:
        return b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(BAD_BASE64) from None
