"""The server's TLS: one policy for every context, and certificate files watched for renewal.

Job: build the ``ssl.SSLContext`` that STARTTLS (RFC 3207) and implicit TLS (RFC 8314)
use, from ``[tls] cert`` and ``key`` in PEM (certbot's ``fullchain.pem`` and
``privkey.pem`` as they are), and keep it current while the server runs.

Policy (the same for every context, Mozilla's "intermediate" profile): TLS 1.2 and 1.3
only; for TLS 1.2 only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (forward
secrecy, AEAD; no CBC, RC4, 3DES, export, anonymous or static-RSA suites); the
server's cipher order; no TLS compression (CRIME), no renegotiation; no client
certificates asked for. TLS 1.3 suites are OpenSSL's defaults, all AEAD.

Renewal without a restart: `Certificates` holds one *front* context that every
listener and every STARTTLS uses. Its ``sni_callback`` (which OpenSSL calls on every
ClientHello, with or without SNI) hands the handshake the current context. At most once
a second, on a handshake, the certificate and key files are stat'ed; when either has
changed (renewal replaces them, or certbot's ``live/`` symlinks move), a new context is
built and, if it loads, takes over for new connections. A broken replacement (a
half-written file, a key that does not match) keeps the old context and is logged once
per change of the files. At start-up a certificate that cannot be loaded is an error
(`ConfigError` for ``tls.cert``, naming the file), so the server does not start without the TLS it was
configured with.

Also here: `describe`, the version and cipher of a connection as the Received field and
the log show them.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError
from .settings import TLSConfig

log = logging.getLogger("monomail.tls")

# Mozilla's "intermediate" TLS 1.2 suites (https://wiki.mozilla.org/Security/Server_Side_TLS).
CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
KEY = "tls.cert"  # the key a certificate error names
RECHECK = 1.0  # seconds between looks at the certificate files


def make_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context to monomail's policy with this certificate chain; `ConfigError`
    (key ``tls.cert``) when the files cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(CIPHERS)
    ctx.verify_mode = ssl.CERT_NONE
    for path in (cert, key):  # load_cert_chain's own errors do not say which file
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(KEY, f"{path}: {exc.strerror}") from None
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except OSError as exc:
        raise ConfigError(KEY, f"{cert}: {exc.strerror}") from None
    except ssl.SSLError as exc:
        raise ConfigError(KEY, f"{cert} / {key}: not a usable PEM certificate chain and key ({exc.reason})") from None
    return ctx


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Certificates:
    """The front context of every TLS listener, and the current certificate behind it."""

    def __init__(self, config: TLSConfig, clock: Callable[[], float] = time.monotonic) -> None:
        assert config.cert is not None and config.key is not None
        self.cert, self.key = config.cert, config.key
        self._clock = clock
        self._stamps = (_stamp(self.cert), _stamp(self.key))
        self.current = make_context(self.cert, self.key)  # raises ConfigError at start-up
        self.front = self.current
        self.front.sni_callback = self._select
        self._checked = self._clock()
        self._refused: tuple[object, ...] | None = None  # the file versions already logged as bad

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        self.refresh()
        if sslobj.context is not self.current:
            sslobj.context = self.current

    def refresh(self, force: bool = False) -> bool:
        """Look at the files (at most once per `RECHECK`); True if a new certificate took over."""
        now = self._clock()
        if not force and now - self._checked < RECHECK:
            return False
        self._checked = now
        stamps = (_stamp(self.cert), _stamp(self.key))
        if stamps == self._stamps or stamps == self._refused:
            return False
        try:
            ctx = make_context(self.cert, self.key)
        except ConfigError as exc:
            self._refused = stamps
            log.error("tls: the changed certificate cannot be used, keeping the old one: %s", exc)
            return False
        self.current, self._stamps, self._refused = ctx, stamps, None
        log.info("tls: certificate reloaded from %s", self.cert)
        return True


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` for a connection's TLS; "" without TLS."""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    version = ssl_object.version() or ""
    return f"{version} {cipher[0]}" if cipher else version
