"""Checking a password with a running Dovecot's auth service (its ``auth-client`` socket).

Job: one function, `authenticate`, that asks Dovecot whether a user name and password are
right, as Postfix (``smtpd_sasl_type = dovecot``), Exim's ``dovecot`` authenticator and
chasquid do, so that a site running Dovecot keeps one password per user. It speaks the
client side of the Dovecot Authentication Protocol, major version 1 ("Dovecot
Authentication Protocol", doc.dovecot.org, developer manual, design/auth_protocol; the
same text was ``doc/auth-protocol.txt`` in Dovecot's source) over a UNIX socket::

    C: VERSION 1 2              C: CPID <our pid>
    S: VERSION 1 <minor>        S: MECH <name> [params]  (one per mechanism)
    S: SPID / CUID / COOKIE     S: DONE
    C: AUTH 1 PLAIN service=smtp nologin rip=<client> [secured] no-penalty resp=<base64>
    S: OK 1 user=<name> ...  |  FAIL 1 [code=temp_fail | temp] ...

(fields are separated by TAB, lines end with LF). The mechanism is always PLAIN with its
initial response (RFC 4616: ``NUL user NUL password``); monomail decodes AUTH PLAIN and
LOGIN from the SMTP client itself, so Dovecot only ever sees a name and a password.
``resp=`` goes last, as the protocol asks. ``nologin`` says the request does not start a
mail session (Postfix sends it too). ``no-penalty`` turns off Dovecot's per-address delay
after failures (chasquid sends it too): monomail counts failures per client address
itself (``auth_failures``, then 421), and a penalty longer than our timeout would only
turn a plain "wrong password" into "backend unavailable". Dovecot's own
``auth_failure_delay`` (2 s by default) still applies before every FAIL.

Answers:

* the user name Dovecot settled on (``OK`` with ``user=``, tab-unescaped; the login name
  when Dovecot gives none): the password is right;
* ``None``: wrong password, unknown user, disabled or expired account, an ``OK`` that
  carries ``nologin`` or ``proxy`` (Dovecot's own login processes refuse those too), and,
  without asking, a name or password that cannot travel in the protocol (empty name;
  TAB, LF, CR or NUL in the name; NUL in the password, which RFC 4616 forbids);
* `monomail.errors.AuthUnavailable` (454 4.7.0) when Dovecot cannot answer now: the socket
  is missing or refuses, the connection drops, the whole exchange takes longer than
  ``timeout``, a ``FAIL`` marked temporary (``code=temp_fail``, or ``temp`` before 2.3),
  or anything the protocol does not allow here (another major version, no PLAIN, an
  unknown line, a line longer than 16 KiB, bytes that are not UTF-8).

What it does not do: decide who may authenticate or when (the SMTP face and its failure
counter do), talk SASL to the SMTP client, or keep a connection open. Each call opens one
connection, does the handshake and one AUTH, and closes it: a few milliseconds on a local
socket (see the tests). Keeping one connection and numbering requests would save the
handshake; that is a possible optimisation, not needed at SMTP AUTH rates.

Security: the password is sent only inside ``resp=`` and is never logged, nor put into an
exception; the lines from Dovecot that may appear in a log are Dovecot's, never ours.

Error handling: `OSError` and timeouts are mapped here, once, to `AuthUnavailable`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
from pathlib import Path

from monomail.errors import AuthUnavailable

__all__ = ["authenticate"]

log = logging.getLogger("monomail.dovecotauth")

MAX_LINE = 16384  # the protocol's "expected to fit" line length (doc, "General")
_REQUEST_ID = "1"  # one request per connection
_UNSAFE = frozenset("\t\n\r\0")
_HANDSHAKE_INFO = frozenset({"SPID", "CUID", "COOKIE"})
# Dovecot's tab-escaping: \001 followed by one of these; anything else stands for itself.
_UNESCAPE = {"0": "\0", "1": "\1", "t": "\t", "r": "\r", "n": "\n", "l": "\n"}


async def authenticate(
    socket_path: Path,
    user: str,
    password: bytes,
    *,
    client_ip: str,
    secured: bool,
    service: str = "smtp",
    timeout: float = 10.0,
) -> str | None:
    """Ask Dovecot at ``socket_path`` whether ``password`` is ``user``'s.

    Returns the user name Dovecot answers with, or None for "no". ``client_ip`` goes to
    Dovecot as ``rip`` (its logs and its policies see the SMTP client's address; a value
    that is not an IP address is left out); ``secured`` says the SMTP session is under
    TLS. Raises `AuthUnavailable` when Dovecot cannot answer (see the module docstring).
    """
    if not user or not _UNSAFE.isdisjoint(user) or b"\0" in password:
        return None
    if not service or not _UNSAFE.isdisjoint(service):
        raise ValueError(f"service name not usable in the Dovecot auth protocol: {service!r}")
    request = _auth_line(user, password, client_ip=client_ip, secured=secured, service=service)
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(socket_path, user, request)
    except TimeoutError:
        raise AuthUnavailable(f"dovecot auth {socket_path}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise AuthUnavailable(f"dovecot auth {socket_path}: {exc.strerror or exc}") from exc


def _auth_line(user: str, password: bytes, *, client_ip: str, secured: bool, service: str) -> bytes:
    fields = ["AUTH", _REQUEST_ID, "PLAIN", f"service={service}", "nologin"]
    rip = _ip_or_none(client_ip)
    if rip is not None:
        fields.append(f"rip={rip}")
    if secured:
        fields.append("secured")
    fields.append("no-penalty")
    initial = b"\0" + user.encode("utf-8") + b"\0" + password
    fields.append("resp=" + base64.b64encode(initial).decode("ascii"))  # must be the last field
    return ("\t".join(fields) + "\n").encode("utf-8")


def _ip_or_none(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


async def _exchange(socket_path: Path, user: str, request: bytes) -> str | None:
    reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=MAX_LINE)
    try:
        writer.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode("ascii"))
        await _handshake(reader, socket_path)
        writer.write(request)
        await writer.drain()
        return _answer(await _read_fields(reader, socket_path), user, socket_path)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _handshake(reader: asyncio.StreamReader, socket_path: Path) -> None:
    """Read the server's handshake up to DONE: version 1, and PLAIN among the mechanisms."""
    version: str | None = None
    mechanisms: set[str] = set()
    while True:
        fields = await _read_fields(reader, socket_path)
        command = fields[0]
        if command == "VERSION" and len(fields) >= 3:
            if fields[1] != "1":
                raise AuthUnavailable(f"dovecot auth {socket_path}: protocol version {fields[1]}, not 1")
            version = fields[1]
        elif command == "MECH" and len(fields) >= 2:
            mechanisms.add(fields[1].upper())
        elif command in _HANDSHAKE_INFO:
            pass
        elif command == "DONE":
            break
        else:
            raise _unexpected(socket_path, "handshake", fields)
    if version is None:
        raise AuthUnavailable(f"dovecot auth {socket_path}: handshake without VERSION")
    if "PLAIN" not in mechanisms:
        raise AuthUnavailable(
            f"dovecot auth {socket_path}: PLAIN not offered (Dovecot's auth_mechanisms must include plain)"
        )


def _answer(fields: list[str], user: str, socket_path: Path) -> str | None:
    command = fields[0]
    if len(fields) < 2 or fields[1] != _REQUEST_ID or command not in ("OK", "FAIL"):
        raise _unexpected(socket_path, "answer", fields)
    params = _params(fields[2:])
    if command == "FAIL":
        if "temp" in params or params.get("code") == "temp_fail":
            raise AuthUnavailable(f"dovecot auth {socket_path}: temporary failure {params.get('reason', '')!r}")
        log.debug("dovecot auth %s: FAIL %s", socket_path, params.get("code", ""))
        return None
    if "nologin" in params or "proxy" in params:
        log.info("dovecot auth %s: OK with %s for %r, refused", socket_path, sorted(params), user)
        return None
    name = params.get("user") or user
    if not _UNSAFE.isdisjoint(name):
        log.warning("dovecot auth %s: unusable user name %r for %r, refused", socket_path, name, user)
        return None
    return name


def _params(fields: list[str]) -> dict[str, str]:
    """Optional parameters: ``name=value`` or a bare boolean (value ``""``), tab-unescaped."""
    params: dict[str, str] = {}
    for field in fields:
        name, _, value = field.partition("=")
        params[name] = _unescape(value)
    return params


def _unescape(text: str) -> str:
    if "\1" not in text:
        return text
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\1":
            following = next(chars, "")
            out.append(_UNESCAPE.get(following, following))
        else:
            out.append(char)
    return "".join(out)


async def _read_fields(reader: asyncio.StreamReader, socket_path: Path) -> list[str]:
    try:
        line = await reader.readline()
    except ValueError:  # asyncio turns "longer than the limit" into ValueError
        raise AuthUnavailable(f"dovecot auth {socket_path}: a line longer than {MAX_LINE} bytes") from None
    if not line.endswith(b"\n"):
        raise AuthUnavailable(f"dovecot auth {socket_path}: connection closed")
    try:
        text = line[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise AuthUnavailable(f"dovecot auth {socket_path}: a line that is not UTF-8") from None
    return text.split("\t")


def _unexpected(socket_path: Path, where: str, fields: list[str]) -> AuthUnavailable:
    shown = "\t".join(fields)
    if len(shown) > 120:
        shown = shown[:120] + "..."
    return AuthUnavailable(f"dovecot auth {socket_path}: unexpected {where} line {shown!r}")
