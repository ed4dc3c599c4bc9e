"""A real Dovecot auth service for tests: Debian's ``dovecot-core`` with a private config.

:class:`DovecotAuth` starts ``dovecot -F -c <tmp>/dovecot.conf`` as a child process, with
everything in a private directory (``base_dir``, ``state_dir``, the log, the users file):

* no protocols (``protocols =``), so no IMAP, POP3, LMTP or submission service and no inet
  listener at all; ``listen = 127.0.0.1`` in case one ever appeared. Only UNIX sockets in
  the private directory; ``tests/test_dovecotauth.py`` checks with ``ss`` that the
  processes listen on no TCP or UDP port;
* ``service auth { unix_listener auth-client { mode = 0600  user = <us> } }``: the socket
  monomail talks to (:attr:`DovecotAuth.socket`), the one Postfix's ``smtpd_sasl_path``
  would name;
* ``passdb`` passwd-file (:attr:`DovecotAuth.users`) with ``{SHA512-CRYPT}`` hashes made by
  ``doveadm pw``; ``userdb`` static (never asked for SMTP AUTH, but Dovecot wants one);
* ``auth_verbose`` and ``auth_debug`` into :attr:`DovecotAuth.log` (the AUTH line Dovecot
  received is there, with ``resp=<hidden>``); ``auth_failure_delay = 0`` (Dovecot still
  sends failures on a 0.5 s timer).

Use it as a context manager or through the pytest fixture::

    import dovecot
    from dovecot import DovecotAuth, running_dovecot

    dovecot_auth = dovecot.dovecot_auth                    # the fixture, in this module's names

    def test_x(dovecot_auth: DovecotAuth) -> None:       # started, no users yet
        dovecot_auth.set_password("alice", "secret")
        ... auth = f"dovecot:{dovecot_auth.socket}" ...

    with running_dovecot({"alice": "secret"}) as dv:       # skips the test if unavailable
        ...

When Dovecot cannot run here (no ``dovecot`` binary, not root, no ``dovecot``/``dovenull``
users, or it does not come up), :class:`DovecotUnavailable` is raised, and
:func:`running_dovecot` / :func:`dovecot_auth` turn it into ``pytest.skip`` with the reason.
Start-up takes well under a second (0.06 s here). :meth:`stop` is a clean stop (SIGTERM to the
master, about a second; SIGKILL to its process group after 5 s); :meth:`close`, which ends the
context manager and the fixture, kills the process group at once and removes the directory.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import pytest

__all__ = ["DovecotAuth", "DovecotUnavailable", "dovecot_auth", "running_dovecot"]

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class DovecotUnavailable(Exception):
    """Dovecot cannot be started here; the message says why."""


def _why_not() -> str | None:
    if not os.path.exists(DOVECOT):
        return "dovecot is not installed (Debian: apt-get install dovecot-core)"
    if not os.path.exists(DOVEADM):
        return "doveadm is not installed"
    if os.geteuid() != 0:
        return "dovecot's master process needs root to start its services"
    for user in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user!r} user (dovecot-core creates it)"
    return None


class DovecotAuth:
    """One private Dovecot running only its auth service (see the module docstring)."""

    def __init__(self, users: Mapping[str, str] | None = None, *, extra_config: str = "") -> None:
        self.dir = Path("/")
        self.process: subprocess.Popen[bytes] | None = None
        self._initial = dict(users or {})
        self._extra = extra_config
        self._passwords: dict[str, str] = {}  # user -> passwd-file hash field
        self._stamp = 0

    # -- paths ---------------------------------------------------------------------------

    @property
    def socket(self) -> Path:
        """The auth-client socket: what ``auth = "dovecot:..."`` names."""
        return self.dir / "run" / "auth-client"

    @property
    def log(self) -> Path:
        return self.dir / "dovecot.log"

    @property
    def users(self) -> Path:
        return self.dir / "users"

    @property
    def config(self) -> Path:
        return self.dir / "dovecot.conf"

    # -- lifetime ------------------------------------------------------------------------

    def __enter__(self) -> DovecotAuth:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start Dovecot (first call: make the directory and config) and wait until it answers."""
        reason = _why_not()
        if reason is not None:
            raise DovecotUnavailable(reason)
        if self.process is not None and self.process.poll() is None:
            return
        if self.dir == Path("/"):
            self._make_dir()
        err = open(self.dir / "stderr", "ab")  # noqa: SIM115 (handed to the child)
        try:
            self.process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # its own process group: stop() can kill all of it
            )
        finally:
            err.close()
        self._wait_ready()

    def stop(self) -> None:
        """Stop Dovecot (SIGTERM to the master, then SIGKILL to its process group); keep the files."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # children left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)

    def close(self) -> None:
        """Kill Dovecot (its whole process group, at once: nothing of it is kept) and remove its directory."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.stop()
        if self.dir != Path("/"):
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = Path("/")

    def pids(self) -> set[int]:
        """The master and every process of its group (for checking what they listen on)."""
        if self.process is None:
            return set()
        found = {self.process.pid}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (entry / "stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    if int(fields[2]) == self.process.pid:  # field 5: process group
                        found.add(int(entry.name))
        return found

    # -- users ---------------------------------------------------------------------------

    def set_password(self, user: str, password: str, *, scheme: str = "SHA512-CRYPT") -> None:
        """Add ``user`` or replace their password (``scheme``: any of ``doveadm pw -l``, or PLAIN).

        On a running Dovecot this returns once the next lookup is sure to see the change,
        which can take up to a second (see `_write_users`); give users to the constructor
        to have them from the start at no cost.
        """
        if any(c in user for c in ":\n\r\t\0") or not user:
            raise ValueError(f"not a passwd-file user name: {user!r}")
        if self.dir == Path("/"):
            self._make_dir()
        self._passwords[user] = self._hash(password, scheme)
        self._write_users()

    def remove_user(self, user: str) -> None:
        """Remove ``user`` from the users file (same wait as `set_password`)."""
        self._passwords.pop(user, None)
        self._write_users()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> str:
        """The first log line containing ``text``, waiting for Dovecot's log process to write it
        (it writes late on a loaded machine: a CI run once waited over 5 s)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in {self.log} after {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)

    # -- inside --------------------------------------------------------------------------

    def _make_dir(self) -> None:
        # Not pytest's tmp_path: it sits under a 0700 directory that Dovecot's unprivileged
        # processes cannot enter, and UNIX socket paths must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="mm-dovecot-", dir="/tmp"))
        self.dir.chmod(0o755)
        for sub in ("run", "state"):
            (self.dir / sub).mkdir(mode=0o755)
        self.config.write_text(self._config_text())
        for user, password in self._initial.items():
            self._passwords[user] = self._hash(password, "SHA512-CRYPT")
        self._write_users()

    def _config_text(self) -> str:
        me = pwd.getpwuid(os.geteuid()).pw_name
        d = self.dir
        return f"""\
# A private Dovecot for monomail's tests: the auth service only, UNIX sockets only.
instance_name = {d.name}
base_dir = {d}/run
state_dir = {d}/state
protocols =
listen = 127.0.0.1
ssl = no
log_path = {self.log}
auth_verbose = yes
auth_debug = yes
auth_failure_delay = 0
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = {self.users}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener auth-client {{
    mode = 0600
    user = {me}
  }}
}}
{self._extra}
"""

    def _hash(self, password: str, scheme: str) -> str:
        if scheme == "PLAIN":
            return "{PLAIN}" + password
        result = subprocess.run(
            [DOVEADM, "-c", str(self.config), "pw", "-s", scheme, "-p", password],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if result.returncode != 0:
            raise DovecotUnavailable(f"doveadm pw failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode().strip()

    def _write_users(self) -> None:
        """Rewrite the users file atomically, readable by Dovecot's auth process (group dovecot).

        Dovecot (src/auth/db-passwd-file.c, ``passwd_file_sync``) looks at the file at most
        once per second of its clock, and re-reads it only when its mtime (whole seconds)
        or size changed. So each rewrite gets an mtime the file never had (a same-length
        hash written within the same second would otherwise go unseen), and while Dovecot
        runs we wait for the next second: a lookup made in the second of the write may
        already have used up that second's look.
        """
        text = "".join(f"{user}:{hashed}\n" for user, hashed in self._passwords.items())
        tmp = self.users.with_name("users.tmp")
        tmp.write_text(text)
        try:
            gid = grp.getgrnam("dovecot").gr_gid
            os.chown(tmp, -1, gid)
            tmp.chmod(0o640)
        except (KeyError, PermissionError):
            tmp.chmod(0o644)
        self._stamp = max(self._stamp + 1, int(time.time()))
        os.utime(tmp, (self._stamp, self._stamp))
        written = time.time()
        os.replace(tmp, self.users)
        if self.process is not None and self.process.poll() is None:
            time.sleep(int(written) + 1.01 - written)

    READY = "auth socket"  # what `_ready` waits for, for the error message

    def _ready(self, timeout: float) -> bool:
        """The auth-client socket gives a full handshake (VERSION ... DONE); OSError if not yet."""
        return _handshake_done(self.socket, timeout)

    def _wait_ready(self) -> None:
        """Until `_ready` says so, or START_TIMEOUT: DovecotUnavailable with Dovecot's own words."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = "no socket yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise DovecotUnavailable(f"dovecot exited at start: {self._tail()}")
            try:
                if self._ready(max(deadline - time.monotonic(), 0.1)):
                    return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.02)
        self.stop()
        raise DovecotUnavailable(f"dovecot's {self.READY} did not answer in {START_TIMEOUT}s ({last}): {self._tail()}")

    def _tail(self) -> str:
        try:
            err = (self.dir / "stderr").read_text(errors="replace")
        except FileNotFoundError:
            err = ""
        return (err + self.log_text())[-1500:].strip()


def _handshake_done(path: Path, timeout: float) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(max(0.1, min(timeout, 2.0)))
        sock.connect(str(path))
        sock.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
        data = b""
        while b"\nDONE\n" not in b"\n" + data:
            chunk = sock.recv(4096)
            if not chunk:
                return False
            data += chunk
        return True


D = TypeVar("D", bound=DovecotAuth)


def _started(dv: D) -> Iterator[D]:
    """``dv`` started for the test and closed after it; the test is skipped when Dovecot cannot run here."""
    try:
        try:
            dv.start()
        except DovecotUnavailable as exc:
            pytest.skip(f"no real Dovecot: {exc}")
        yield dv
    finally:
        dv.close()


@contextlib.contextmanager
def running_dovecot(users: Mapping[str, str] | None = None, *, extra_config: str = "") -> Iterator[DovecotAuth]:
    """A started :class:`DovecotAuth`; the calling test is skipped when Dovecot cannot run here."""
    yield from _started(DovecotAuth(users, extra_config=extra_config))


@pytest.fixture
def dovecot_auth() -> Iterator[DovecotAuth]:
    """A started private Dovecot with no users yet (add them with ``set_password``)."""
    with running_dovecot() as dv:
        yield dv


# -- a mail store: LMTP in, IMAP out -------------------------------------------------------


class DovecotMail(DovecotAuth):
    """A private Dovecot with LMTP (UNIX socket :attr:`lmtp_socket` and 127.0.0.1:
    :attr:`lmtp_port`) and IMAP (127.0.0.1::attr:`imap_port`, plaintext LOGIN), Maildirs
    under a temp directory owned by ``nobody`` (``mail_uid``: Dovecot writes them as that
    account, not as root), and the quota plugin (a user given a ``quota`` rule, such as
    ``"1K"``, gets ``quota_rule = *:storage=<quota>``; Dovecot then answers ``552 5.2.2`` for
    them at the end of DATA). Users are looked up by the local part (``username_format =
    %Ln``), so ``alice@any.domain`` is user ``alice``. Dovecot's own log
    (:attr:`log`) has one ``Connect from`` line per LMTP session (``log_debug`` of lmtp).
    """

    def __init__(self, users: Mapping[str, str] | None = None, *, quota: Mapping[str, str] | None = None,
                 tls: tuple[str, str] | None = None, extra_config: str = "") -> None:
        super().__init__(users, extra_config=extra_config)
        self._quota = dict(quota or {})
        self._tls = tls  # (certfile, keyfile): ssl = yes, so LMTP on TCP offers STARTTLS
        self.lmtp_port = _free_port()
        self.imap_port = _free_port()
        owner = pwd.getpwnam("nobody") if _has_user("nobody") else None
        self._uid = owner.pw_uid if owner else 65534
        self._gid = owner.pw_gid if owner else 65534

    @property
    def lmtp_socket(self) -> Path:
        return self.dir / "run" / "lmtp"

    @property
    def mail(self) -> Path:
        return self.dir / "mail"

    def _make_dir(self) -> None:
        super()._make_dir()
        self.mail.mkdir(mode=0o755)
        os.chown(self.mail, self._uid, self._gid)

    def _config_text(self) -> str:
        d = self.dir
        users = self.users
        return f"""\
# A private Dovecot for monomail's LMTP tests: LMTP and IMAP on loopback, Maildirs in {self.mail}.
instance_name = {d.name}
base_dir = {d}/run
state_dir = {d}/state
protocols = lmtp imap
listen = 127.0.0.1
{f"ssl = yes{chr(10)}ssl_cert = <{self._tls[0]}{chr(10)}ssl_key = <{self._tls[1]}" if self._tls else "ssl = no"}
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {self.log}
info_log_path = {self.log}
auth_verbose = yes
mail_location = maildir:{self.mail}/%n
mail_plugins = $mail_plugins quota
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = passwd-file
  args = username_format=%Ln {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%Ln {users}
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{self._extra}
"""

    def _write_users(self) -> None:
        """passwd-file lines with uid, gid and home (``nobody``), a quota rule where asked."""
        lines = []
        for user, hashed in self._passwords.items():
            extra = f"userdb_quota_rule=*:storage={self._quota[user]}" if user in self._quota else ""
            lines.append(f"{user}:{hashed}:{self._uid}:{self._gid}::{self.mail}/{user}::{extra}\n")
        tmp = self.users.with_name("users.tmp")
        tmp.write_text("".join(lines))
        tmp.chmod(0o644)
        os.replace(tmp, self.users)

    READY = "LMTP socket"

    def _ready(self, timeout: float) -> bool:
        """The LMTP socket greets and the IMAP port accepts; OSError if not yet."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(self.lmtp_socket))
            if not sock.recv(512).startswith(b"220"):
                return False
        socket.create_connection(("127.0.0.1", self.imap_port), 2.0).close()
        return True

    def lmtp_sessions(self) -> int:
        """LMTP connections Dovecot has logged so far."""
        return sum(1 for line in self.log_text().splitlines() if "lmtp(" in line and "Connect from" in line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def running_mail_store(users: Mapping[str, str], *, quota: Mapping[str, str] | None = None,
                       tls: tuple[str, str] | None = None) -> Iterator[DovecotMail]:
    """A started :class:`DovecotMail`; the calling test is skipped when Dovecot cannot run here
    (``dovecot-lmtpd`` or ``dovecot-imapd`` missing among the reasons)."""
    for binary in ("lmtp", "imap"):
        if not os.path.exists(f"/usr/lib/dovecot/{binary}"):
            pytest.skip(f"no real Dovecot: /usr/lib/dovecot/{binary} missing (Debian: dovecot-{binary}d)")
    yield from _started(DovecotMail(users, quota=quota, tls=tls))
