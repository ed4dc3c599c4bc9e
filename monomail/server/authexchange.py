"""The AUTH exchange of a session (RFC 4954): aiosmtpd's mechanisms, our reading and checking.

Job: the part of `server.Session` that runs one AUTH command once the transaction core
(``transaction``) has asked for it: aiosmtpd's PLAIN and LOGIN exchanges (PLAIN ours, to
keep the authorization identity aiosmtpd drops and to take ``=`` as the empty initial
response), each 334 round read with the session's own line reader (an over-long line:
500 5.5.6), the whole exchange under ``server.command_timeout``, the credentials checked
by the ``auth`` backend, failures counted per client (``limits.FailureWindow``; past the
limit 421 4.7.0 and close) and logged on the line fail2ban reads.

A mixin over aiosmtpd's ``SMTP``: `server.Session` sets the attributes declared here and
provides `_read_line`.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from base64 import b64decode, b64encode
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from .. import maillog
from ..auth import Authenticator
from ..errors import AuthUnavailable, Reply
from ..limits import FailureWindow
from ..settings import Config
from ..transaction import AUTH_INVALID, Next, Step, Transaction

log = logging.getLogger("monomail.smtp")

AUTH_BLOCKED = Reply(421, "4.7.0", "Too many authentication failures, try again later")
COMMAND_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for a command, closing connection")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
AUTH_EXCHANGE_FAILED = Reply(501, "5.5.2", "Authentication exchange failed")  # aiosmtpd said why


class TooLong(Exception):
    """An AUTH response line longer than ``line_length_limit`` (skipped to its end)."""


class AuthExchange(SMTP):
    """AUTH for a session; the attributes below are the session's."""

    AuthLoginUsernameChallenge = "Username:"  # what clients expect (aiosmtpd's has a NUL)
    AuthLoginPasswordChallenge = "Password:"

    cfg: Config
    auth: Authenticator
    core: Transaction
    failures: FailureWindow
    peer_ip: str
    client: str
    session_id: str
    _credentials: LoginPassword | None
    _authzid: bytes

    async def _read_line(self) -> bytes | None:
        """One line from the client; None when it was too long (the session's reader)."""
        raise NotImplementedError

    async def auth_PLAIN(self, _: object, args: list[str]) -> AuthResult:
        """aiosmtpd's PLAIN exchange, keeping the authzid that aiosmtpd's own drops, and
        taking ``=`` as the empty initial response (RFC 4954 §4)."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:  # cancelled, or not base64: aiosmtpd has answered
                return AuthResult(success=False)
        else:
            try:
                blob = b"" if args[1] == "=" else b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        self._authzid = parts[0]
        return self._capture(self, None, None, "PLAIN", LoginPassword(parts[1], parts[2]))

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's 334 round (its auth mechanisms call it): the decoded response, or
        aiosmtpd's ``MISSING`` when it was cancelled or not base64 (and answered). The
        line is read with `_read_line`: an over-long one raises `TooLong` (500 5.5.6, RFC 4954 §4)."""
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(data) if encode_to_b64 else data))
        line = await self._read_line()
        if line is None:
            raise TooLong
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Authentication cancelled")
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    def _capture(self, server: object, session: object, envelope: object, mechanism: str,
                 auth_data: object) -> AuthResult:
        """aiosmtpd's authenticator: keep what the exchange read; `_auth_exchange` checks it."""
        self._credentials = auth_data if isinstance(auth_data, LoginPassword) else None
        return AuthResult(success=True, handled=True)

    async def _auth_exchange(self) -> Step:
        request = self.core.auth_request
        assert request is not None
        mechanism, initial = request
        if self.failures.blocked(self.client):
            log.warning("auth blocked client=[%s]: too many failures", self.peer_ip)
            return Step((AUTH_BLOCKED,), Next.CLOSE)
        exchange = self.auth_PLAIN if mechanism == "PLAIN" else self.auth_LOGIN
        self._credentials = None
        try:
            async with asyncio.timeout(self.cfg.server.command_timeout):
                result = await exchange(self, [mechanism, *([initial] if initial else [])])
        except TimeoutError:
            return Step((COMMAND_TIMEOUT,), Next.CLOSE)
        except TooLong:
            return self.core.answer(AUTH_LINE_TOO_LONG)
        credentials, self._credentials = self._credentials, None
        authzid, self._authzid = self._authzid.decode("utf-8", "replace"), b""
        if not result.success or credentials is None:  # aiosmtpd has answered (501 ...)
            return self.core.answer(AUTH_EXCHANGE_FAILED, sent=True)
        user = credentials.login.decode("utf-8", "replace")
        try:
            login = await self.auth.check(user, credentials.password, client_ip=self.peer_ip)
        except AuthUnavailable as exc:
            log.error("auth unavailable client=[%s] user=%s: %s", self.peer_ip, maillog.printable(user),
                      maillog.printable(exc.detail))
            return self.core.answer(exc.reply)
        if login is not None and authzid and authzid.lower() not in (user.lower(), login.lower()):
            log.warning("auth refused client=[%s] user=%s authzid=%s: may not act as another user",
                        self.peer_ip, maillog.printable(login), maillog.printable(authzid))
            login = None  # RFC 4616 §2: a user acts only as itself here
        if login is None:
            self.failures.fail(self.client)
            log.warning("auth failed client=[%s] user=%s session=%s mechanism=%s", self.peer_ip,  # (fail2ban's line)
                        maillog.printable(user), self.session_id, mechanism)
            return self.core.answer(AUTH_INVALID)
        log.info("auth ok client=[%s] user=%s mechanism=%s", self.peer_ip, maillog.printable(login), mechanism)
        return self.core.authenticated(login)
