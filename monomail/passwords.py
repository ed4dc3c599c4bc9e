"""The password file: salted scrypt hashes, one ``user:hash`` line each.

Job: answer "is this the password of this user?" from the file ``monomail passwd`` writes
(``auth.password_file``), and write that file. Passwords are never stored, logged or kept in
clear: only the hash of a slow, memory-hard function (scrypt, RFC 7914, the stdlib's
``hashlib.scrypt``) with a random salt per password.

Not its job: the SMTP AUTH exchange (``server``), counting failures per client address,
Dovecot's auth service (another backend).

The hash format is passlib's ``scrypt`` format, so passlib (and what reads it: Django's
passlib hashers, zig-passlib, Ruby's crypt_checkpass) can read our hashes, and we read
theirs::

    $scrypt$ln=14,r=8,p=1$<salt>$<digest>

``ln`` is log2 of scrypt's cost N, ``r`` the block size, ``p`` the parallelism, all in
decimal without leading zeros; salt (16 random bytes) and digest (32 bytes, scrypt's
``dklen``) are in standard base64 (``A-Za-z0-9+/``) with the ``=`` padding left off. This is
passlib's ``b64s_encode``, which its scrypt handler uses (not its ``ab64`` variant, which
writes ``.`` for ``+``: that one is for its pbkdf2 hashes). We write ``ln=14, r=8, p=1``
(16 MiB, some tens of milliseconds); `verify` also takes ``ln`` 10..20, ``r`` 1..32, ``p``
1..16, a salt of 8..64 bytes and a 32-byte digest, within `MAX_MEMORY`; anything else is
refused (False), never an exception.

File format: one ``user:hash`` per line; blank lines and lines starting with ``#`` are
comments. User names compare case-insensitively (lower-cased). A line that is not
``user:hash`` with a hash in the format above is skipped, and reported once per version of
the file in the ``monomail.auth`` log as ``path:line`` (its content never goes to the log:
it could be a password pasted by mistake). A user named twice: the first line counts.

Security: comparison of digests is constant-time (``hmac.compare_digest``); an unknown user
is checked against a fixed dummy hash with our default parameters, so the time taken does
not say whether a user exists. A missing file means nobody can log in.

Error handling: `PasswordFile.check` raises `AuthUnavailable` (454 4.7.0) when the file
exists but cannot be read (permissions, I/O error, a folder in its place), so a broken file
is a temporary failure, never "wrong password". `set_password` raises ``OSError`` (the file
is then left as it was) and ``ValueError`` for an empty password or a bad user name.

Blocking: everything here blocks (scrypt takes tens of milliseconds on purpose); the server
calls it in a thread. `PasswordFile` may be shared by threads.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import AuthUnavailable
from .safeio import write_file

log = logging.getLogger("monomail.auth")

LN, R, P = 14, 8, 1  # what we write: N = 2**14, 16 MiB
SALT_BYTES = 16
DIGEST_BYTES = 32
LN_RANGE, R_RANGE, P_RANGE = range(10, 21), range(1, 33), range(1, 17)
SALT_RANGE = range(8, 65)
MAX_MEMORY = (1 << 30) + (64 << 20)  # scrypt needs about 128*r*N bytes; ln=20, r=8 fits

_NUM = r"([1-9][0-9]{0,2})"
_B64 = r"([A-Za-z0-9+/]+)"
_HASH = re.compile(rf"\$scrypt\$ln={_NUM},r={_NUM},p={_NUM}\${_B64}\${_B64}", re.ASCII)
_USER = re.compile(r"[!-9;-~]+")  # printable ASCII but ':'; config.py's user names are a subset

# Checked when the user is unknown: same parameters as ours, a password nobody has.
DUMMY_HASH = "$scrypt$ln=14,r=8,p=1$8kZohHPDKwPvIhFddEyHbg$s+O6gJ8SPqwVud6lK1frH9jJGTyD25QEcAAZob9lbSY"


@dataclass(frozen=True, slots=True)
class _Hash:
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes | None:
    if len(text) % 4 == 1:
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _parse(stored: str) -> _Hash | None:
    """The parts of a stored hash, or None if it is not one we would compute."""
    m = _HASH.fullmatch(stored)
    if m is None:
        return None
    ln, r, p = int(m[1]), int(m[2]), int(m[3])
    salt, digest = _b64decode(m[4]), _b64decode(m[5])
    if ln not in LN_RANGE or r not in R_RANGE or p not in P_RANGE:
        return None
    if salt is None or len(salt) not in SALT_RANGE or digest is None or len(digest) != DIGEST_BYTES:
        return None
    return _Hash(ln, r, p, salt, digest)


def _scrypt(password: bytes, h: _Hash) -> bytes | None:
    try:
        return hashlib.scrypt(password, salt=h.salt, n=1 << h.ln, r=h.r, p=h.p,
                              dklen=len(h.digest), maxmem=MAX_MEMORY)
    except ValueError:  # more memory than MAX_MEMORY, or parameters OpenSSL refuses
        return None


def hash_password(password: bytes) -> str:
    """A new salted hash of ``password`` in passlib's scrypt format (see the module doc)."""
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.scrypt(password, salt=salt, n=1 << LN, r=R, p=P, dklen=DIGEST_BYTES)
    return f"$scrypt$ln={LN},r={R},p={P}${_b64encode(salt)}${_b64encode(digest)}"


def verify(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches ``stored``; False for a hash we do not accept."""
    h = _parse(stored)
    if h is None:
        return False
    got = _scrypt(password, h)
    return got is not None and hmac.compare_digest(got, h.digest)


_DUMMY = _parse(DUMMY_HASH)
assert _DUMMY is not None


def _user_of(line: bytes) -> str | None:
    """The (lower-cased) user a stripped non-comment line is about, if it names one."""
    user_b, sep, _ = line.partition(b":")
    user = user_b.decode("ascii", "replace")
    return user.lower() if sep and _USER.fullmatch(user) else None


def _entry(line: bytes) -> tuple[str, str] | None:
    """``(user, hash)`` of a stripped non-comment line, or None if it is malformed."""
    user = _user_of(line)
    stored = line.partition(b":")[2].decode("ascii", "replace")
    if user is None or _parse(stored) is None:
        return None
    return user, stored


def _is_comment(line: bytes) -> bool:
    return not line or line.startswith(b"#")


def parse_file(data: bytes, name: str) -> dict[str, str]:
    """User → hash from a password file's bytes; malformed lines are logged (``name:line``)."""
    hashes: dict[str, str] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip()
        if _is_comment(line):
            continue
        entry = _entry(line)
        if entry is None:
            log.warning("password file %s:%d: not a user:hash line; skipped", name, number)
        elif entry[0] in hashes:
            log.warning("password file %s:%d: a user named again; this line is ignored", name, number)
        else:
            hashes[entry[0]] = entry[1]
    return hashes


_Version = tuple[int, int, int]
_MISSING: _Version = (-1, -1, -1)


class PasswordFile:
    """The password file at ``path``, re-read whenever it changes (inode, mtime or size)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._version: _Version | None = None
        self._hashes: dict[str, str] = {}

    def check(self, user: str, password: bytes) -> bool:
        """Whether ``password`` is ``user``'s. Takes as long for an unknown user.

        Raises `AuthUnavailable` if the file exists but cannot be read."""
        stored = self._current().get(user.lower())
        if stored is None:
            verify(DUMMY_HASH, password)
            return False
        return verify(stored, password)

    def _current(self) -> dict[str, str]:
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                if self._version != _MISSING:
                    log.warning("password file %s: missing; no one can log in", self.path)
                    self._version, self._hashes = _MISSING, {}
                return self._hashes
            except OSError as exc:
                raise AuthUnavailable(f"password file {self.path}: {exc.strerror or exc}") from exc
            if (st.st_ino, st.st_mtime_ns, st.st_size) != self._version:
                self._version, self._hashes = self._read()
            return self._hashes

    def _read(self) -> tuple[_Version, dict[str, str]]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:  # removed between stat and open
            return _MISSING, {}
        except OSError as exc:
            raise AuthUnavailable(f"password file {self.path}: {exc.strerror or exc}") from exc
        return (st.st_ino, st.st_mtime_ns, st.st_size), parse_file(data, str(self.path))


def set_password(path: Path, user: str, password: bytes) -> None:
    """Set ``user``'s password in the file at ``path`` (created if missing), atomically.

    Every other line, comments included, stays as it was; the user's line (the first, if
    named twice) is replaced where it is, or appended. The file gets mode 0600 and keeps its
    owner when we may give it back. A symbolic link is followed: its target is rewritten.
    Concurrent calls are serialised (``flock`` on the folder).
    """
    path = path.resolve()
    user = user.lower()
    if not _USER.fullmatch(user):
        raise ValueError(f"not a user name for the password file: {user!r}")
    if not password:
        raise ValueError("empty password")
    new = f"{user}:{hash_password(password)}".encode("ascii")
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            old = os.stat(path)
            data = path.read_bytes()
        except FileNotFoundError:
            old, data = None, b""
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for i, raw in enumerate(lines):
            line = raw.strip()
            if not _is_comment(line) and _user_of(line) == user:
                lines[i] = new
                break
        else:
            lines.append(new)
        write_file(path, b"".join(line + b"\n" for line in lines), mode=0o600)
        if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
            with contextlib.suppress(PermissionError):
                os.chown(path, old.st_uid, old.st_gid)
    finally:
        os.close(folder)
