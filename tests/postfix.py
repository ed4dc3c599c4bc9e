"""A real Postfix as a test peer: a private instance on loopback that relays to monomail.

:class:`PostfixPeer` writes its own ``main.cf`` and ``master.cf`` into a config directory under
a temp dir, with its own queue and data directories there too, and starts it with
``postfix -c DIR start``. Mail goes in over SMTP on its loopback port (``send``, smtplib), and
Postfix relays everything to ``relayhost = [127.0.0.1]:<port>`` (monomail in the tests). Its
log goes to a file (``maillog_file``, Postfix >= 3.4) that the test reads: ``log()``,
``wait_for_log()``, ``tls_connections()`` (the "TLS connection established" lines with the
protocol and cipher), ``deliveries()`` (the ``status=`` lines).

Nothing leaves the machine: ``inet_interfaces = 127.0.0.1``, ``inet_protocols = ipv4``, no
DNS at all (``smtp_dns_support_level = disabled``, a bracketed IP relayhost, no client name
lookups by smtpd), no local delivery (``mydestination`` empty, no alias maps), nothing in
chroot (so no copy of /etc is needed), and the default instance in /etc/postfix is never used.

What it does not do: it does not install or configure the system's Postfix, and it offers no
inbound TLS (the tests use it as a client of monomail). :func:`postfix_unavailable` says why
a test must skip (not root, no postfix, Postfix older than 3.4); the ``postfix`` pytest
fixture (see :func:`postfix_fixture`) starts peers and stops them at teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest

__all__ = ["Delivery", "PostfixPeer", "TLSConnection", "postfix_fixture", "postfix_unavailable"]

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"

# Every service runs unprivileged-chroot "n": the instance has no copy of /etc in its queue dir.
_MASTER_CF = """\
{listen}  inet  n  -  n  -  -  smtpd
pickup    unix  n  -  n  60    1  pickup
cleanup   unix  n  -  n  -     0  cleanup
qmgr      unix  n  -  n  300   1  qmgr
tlsmgr    unix  -  -  n  1000? 1  tlsmgr
rewrite   unix  -  -  n  -     -  trivial-rewrite
bounce    unix  -  -  n  -     0  bounce
defer     unix  -  -  n  -     0  bounce
trace     unix  -  -  n  -     0  bounce
verify    unix  -  -  n  -     1  verify
flush     unix  n  -  n  1000? 0  flush
proxymap  unix  -  -  n  -     -  proxymap
proxywrite unix -  -  n  -     1  proxymap
smtp      unix  -  -  n  -     -  smtp
relay     unix  -  -  n  -     -  smtp
showq     unix  n  -  n  -     -  showq
error     unix  -  -  n  -     -  error
retry     unix  -  -  n  -     -  error
discard   unix  -  -  n  -     -  discard
anvil     unix  -  -  n  -     1  anvil
scache    unix  -  -  n  -     1  scache
postlog   unix-dgram n - n  -     1  postlogd
"""


def postfix_unavailable() -> str | None:
    """Why a Postfix peer cannot run here (a skip reason), or None if it can."""
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (postfix -c DIR start)"
    if not (os.access(POSTFIX, os.X_OK) and os.access(POSTCONF, os.X_OK)):
        return "postfix is not installed"
    try:
        version = subprocess.run([POSTCONF, "-d", "-h", "mail_version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"postconf does not run: {e}"
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < (3, 4):
        return f"Postfix {version or '?'} has no maillog_file (3.4 or newer needed)"
    for name, getter in (("user postfix", _uid), ("group postdrop", _gid)):
        if getter() is None:
            return f"no {name} on this system"
    return None


def _uid() -> int | None:
    import pwd

    with contextlib.suppress(KeyError):
        return pwd.getpwnam("postfix").pw_uid
    return None


def _gid() -> int | None:
    import grp

    with contextlib.suppress(KeyError):
        return grp.getgrnam("postdrop").gr_gid
    return None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TLSConnection:
    """One ``smtp_tls_loglevel = 1`` line: ``<trust> TLS connection established to <peer>: <protocol> with
    cipher <cipher> ...``."""

    trust: str      # "Anonymous", "Untrusted", "Trusted", "Verified"
    peer: str       # e.g. "127.0.0.1[127.0.0.1]:2525"
    protocol: str   # e.g. "TLSv1.3"
    cipher: str     # e.g. "TLS_AES_256_GCM_SHA384"
    line: str


@dataclass(frozen=True)
class Delivery:
    """One delivery attempt of the smtp client: ``to=<...>, relay=..., ..., status=sent (...)``."""

    queue_id: str
    to: str
    relay: str
    status: str     # "sent", "deferred", "bounced"
    detail: str     # the text in parentheses: the remote reply or the error
    line: str


_TLS_RE = re.compile(r"postfix[^:]*/smtp\[\d+\]: (\w+) TLS connection established to (\S+): "
                     r"(\S+) with cipher (\S+)")
_DELIVERY_RE = re.compile(r"postfix[^:]*/smtp\[\d+\]: ([0-9A-F]+): to=<([^>]*)>, relay=([^,]+), .*?"
                          r"status=(\w+) \((.*)\)$")


class PostfixPeer:
    """A private Postfix instance on ``host:port`` (``port=0``: a free one) relaying to ``relayhost``.

    ``main`` adds or overrides main.cf parameters (e.g. ``{"smtp_tls_security_level": "may"}``);
    ``services`` adds master.cf lines (each ending in a newline).
    ``base`` is the directory under which ``config/``, ``queue/``, ``data/`` and ``maillog`` go
    (a fresh temp dir when None). After :meth:`start`, :attr:`port` is where it listens.
    """

    def __init__(self, relayhost: tuple[str, int], *, base: Path | None = None, host: str = "127.0.0.1",
                 port: int = 0, main: dict[str, str] | None = None, name: str = "postfix-peer",
                 services: str = "") -> None:
        if not host.startswith("127."):
            raise ValueError(f"a Postfix test peer listens on 127.0.0.x only, not {host!r}")
        if not relayhost[0].startswith("127."):
            raise ValueError(f"a Postfix test peer relays to 127.0.0.x only, not {relayhost[0]!r}")
        self.relayhost = relayhost
        self.host = host
        self.port = port
        self.name = name
        self.extra = dict(main or {})
        self.services = services  # more master.cf lines (e.g. the virtual delivery agent)
        self._own_base = base is None
        self.base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="postfix-peer-"))
        self.config_dir = self.base / "config"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.maillog = self.base / "maillog"
        self.started = False

    # -- configuration -----------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters this instance runs with."""
        host, port = self.relayhost
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.peer.test",
            "mydomain": "peer.test",
            "myorigin": "$myhostname",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "",
            "relayhost": f"[{host}]:{port}",
            # No DNS at all: the relayhost is a bracketed IP literal, the client does no MX/A lookups,
            # and smtpd does no reverse lookups of its (loopback) clients.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "encrypt",
            "smtp_tls_loglevel": "1",
            "smtp_tls_session_cache_database": "",
            "smtpd_tls_security_level": "none",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"{self.base}, /var, /dev/stdout",
            "syslog_name": self.name,
            # Fast and bounded: a test sees a deferral in the log at once and never waits for a retry.
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "smtp_connect_timeout": "5s",
            "smtp_helo_timeout": "10s",
            "smtp_starttls_timeout": "10s",
            "smtp_data_done_timeout": "30s",
            "notify_classes": "",
            "biff": "no",
            "smtputf8_enable": "yes",
            "message_size_limit": "52428800",
            "smtpd_banner": "$myhostname ESMTP",
        }
        params.update(self.extra)
        return params

    def _write_config(self) -> None:
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        postfix_uid, postdrop_gid = _uid(), _gid()
        assert postfix_uid is not None and postdrop_gid is not None
        os.chown(self.data_dir, postfix_uid, -1)
        # The base dir may be a pytest tmp_path (mode 0700): Postfix's daemons run as user postfix
        # and must reach the queue and data dirs below it.
        for d in (self.base, *self.base.parents):
            if d == Path("/"):
                break
            mode = d.stat().st_mode
            if not mode & 0o001:
                with contextlib.suppress(OSError):
                    os.chmod(d, mode | 0o001)
        lines = [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(listen=f"{self.host}:{self.port}")
                                                  + self.services)

    # -- lifecycle ---------------------------------------------------------------------------

    def postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c <config> ARGS`` (e.g. ``"flush"``)."""
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args], capture_output=True, text=True,
                              timeout=timeout, env=self._env())

    def postconf(self, *args: str) -> str:
        """``postconf -c <config> ARGS`` → its output (e.g. ``postconf("-h", "relayhost")``)."""
        done = subprocess.run([POSTCONF, "-c", str(self.config_dir), *args], capture_output=True, text=True,
                              timeout=30, env=self._env())
        return done.stdout

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        env["MAIL_CONFIG"] = str(self.config_dir)
        return env

    def start(self, timeout: float = 60, attempts: int = 3) -> PostfixPeer:
        """Write the config and start the instance; wait for its own banner (``220 postfix.peer.test``),
        so a stranger that took the port first is never mistaken for it. A port lost to a race is
        retried with a fresh one (when the port was not given)."""
        reason = postfix_unavailable()
        if reason:
            raise RuntimeError(reason)
        chosen = self.port
        errors = []
        for _ in range(attempts):
            self.port = chosen or _free_port(self.host)
            try:
                return self._start_once(timeout)
            except RuntimeError as e:
                errors.append(str(e))
                self.stop(keep_base=True)
                with contextlib.suppress(FileNotFoundError):
                    self.maillog.rename(self.maillog.with_suffix(f".failed{len(errors)}"))
                if chosen:
                    break
        raise RuntimeError("Postfix did not start: " + " | ".join(errors))

    def _start_once(self, timeout: float) -> PostfixPeer:
        self._write_config()
        done = self.postfix("check")
        if done.returncode != 0:
            raise RuntimeError(f"postfix check failed: {done.stderr.strip()}")
        done = self.postfix("start")
        self.started = True
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stderr.strip()} {self.log()[-2000:]}")
        banner = f"220 {self.main_cf()['myhostname']} ".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(r"fatal: .*bind|fatal: .*[Aa]ddress already in use", self.log()):
                break
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.5) as s:
                s.settimeout(5)
                if s.recv(200).startswith(banner):
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"postfix did not answer on {self.host}:{self.port}: {self.log()[-2000:]}")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _processes(self) -> list[int]:
        """Every process started by this instance: its master and the master's children."""
        master = self.master_pid()
        if master is None:
            return []
        pids = [master]
        with contextlib.suppress(OSError):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                    if ppid == master:
                        pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 20, keep_base: bool = False) -> None:
        """``postfix stop``, then SIGKILL whatever of this instance is left; the temp dir goes too
        when this object made it (unless ``keep_base``)."""
        pids = self._processes()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.postfix("stop", timeout=timeout)
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.started = False
        if self._own_base and not keep_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostfixPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- mail in -----------------------------------------------------------------------------

    def send(self, mail_from: str, rcpt_to: list[str], message: EmailMessage | bytes, timeout: float = 30) -> str:
        """Hand one message to this Postfix over SMTP → its queue id (from the 250 reply)."""
        with smtplib.SMTP(self.host, self.port, timeout=timeout) as client:
            client.ehlo("client.test")
            data = message.as_bytes(policy=SMTP) if isinstance(message, EmailMessage) else message
            client.mail(mail_from)
            for rcpt in rcpt_to:
                code, reply = client.rcpt(rcpt)
                if code != 250:
                    raise smtplib.SMTPRecipientsRefused({rcpt: (code, reply)})
            code, reply = client.data(data)
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
        match = re.search(r"queued as ([0-9A-F]+)", reply.decode(errors="replace"))
        return match.group(1) if match else ""

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now (``postfix flush``)."""
        self.postfix("flush")

    # -- what happened -----------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first match of the regex ``pattern`` in the log, waiting up to ``timeout`` seconds."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the Postfix log within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def tls_connections(self) -> list[TLSConnection]:
        return [TLSConnection(m.group(1), m.group(2), m.group(3), m.group(4), m.group(0))
                for m in _TLS_RE.finditer(self.log())]

    def deliveries(self, queue_id: str | None = None) -> list[Delivery]:
        out = []
        for line in self.log().splitlines():
            m = _DELIVERY_RE.search(line)
            if m and (queue_id is None or m.group(1) == queue_id):
                out.append(Delivery(m.group(1), m.group(2), m.group(3), m.group(4), m.group(5), line))
        return out

    def wait_delivered(self, queue_id: str, timeout: float = 30) -> Delivery:
        """The ``status=sent`` line of ``queue_id`` (AssertionError with the log if none in time)."""
        self.wait_for_log(rf"{queue_id}: to=<[^>]*>, relay=.*status=sent", timeout)
        return next(d for d in self.deliveries(queue_id) if d.status == "sent")

    def queue_empty(self) -> bool:
        """True when no message is waiting (active, incoming, deferred, hold)."""
        for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _root, _dirs, files in os.walk(self.queue_dir / sub):
                if files:
                    return False
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def postfix_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Body of the ``postfix`` fixture: ``postfix(relay_port, **kw)`` → a started :class:`PostfixPeer`
    relaying to 127.0.0.1:relay_port, stopped at teardown; skips when Postfix cannot run here.

    Use it from a test module (or conftest) as::

        postfix = pytest.fixture(postfix_fixture)
    """
    reason = postfix_unavailable()
    if reason:
        pytest.skip(reason)
    started: list[PostfixPeer] = []

    def start(relay_port: int, relay_host: str = "127.0.0.1", **kw: Any) -> PostfixPeer:
        base = tmp_path_factory.mktemp("postfix")
        peer = PostfixPeer((relay_host, relay_port), base=base, **kw)
        started.append(peer)
        return peer.start()

    yield start
    for peer in started:
        peer.stop()
