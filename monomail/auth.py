"""Checking a user's password for SMTP AUTH: the password file, or a running Dovecot.

Job: one `Authenticator` that the SMTP face asks "is this the password of this user?",
built from ``[auth]``: ``dovecot = "dovecot:/path/to/auth-client"`` asks Dovecot's auth
service (``dovecotauth``, as Postfix's ``smtpd_sasl_type = dovecot`` does), else the
password file (``passwords``: salted scrypt hashes, written by ``monomail passwd``).

The event loop never waits on a hash: a password-file check runs in a worker thread,
at most `PARALLEL` at once (each scrypt check holds 16 MiB for some 50 ms), so a burst
of AUTH attempts queues here instead of exhausting memory. The answer is the user's
login name (Dovecot's canonical name), or None for wrong credentials, whether the user
exists or not; `errors.AuthUnavailable` (454 4.7.0) when the backend cannot answer.

Not here: the SASL exchange (``server``, with aiosmtpd's), counting failures
(``limits``), what an authenticated user may send (``policy.owns``).
"""

from __future__ import annotations

import asyncio

from . import dovecotauth
from .passwords import PasswordFile
from .settings import AuthConfig

PARALLEL = 4  # password-file checks running at once


class Authenticator:
    """The configured password backend."""

    def __init__(self, config: AuthConfig) -> None:
        self.dovecot = config.dovecot
        self.file = PasswordFile(config.password_file)
        self._slots: asyncio.Semaphore | None = None  # made on the running loop

    async def check(self, user: str, password: bytes, *, client_ip: str) -> str | None:
        """The login name if ``password`` is ``user``'s, else None; `AuthUnavailable`."""
        if self.dovecot is not None:
            return await dovecotauth.authenticate(self.dovecot, user, password, client_ip=client_ip,
                                                  secured=True)
        if self._slots is None:
            self._slots = asyncio.Semaphore(PARALLEL)
        async with self._slots:
            ok = await asyncio.to_thread(self.file.check, user, password)
        return user.lower() if ok else None
