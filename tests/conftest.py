"""Shared test scaffolding: configs written as real TOML files, and monomail servers
started for real (in a thread with its own event loop, or as a subprocess) on loopback.

Nothing of monomail is mocked: tests talk to the server over sockets with real clients
and read mailboxes back with the stdlib ``mailbox`` module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from unixaccounts import unix_account  # noqa: F401  (a fixture for every test module)

from monomail.app import App
from monomail.config import Config, load

ROOT = Path(__file__).resolve().parent.parent


def base_config(**overrides: Any) -> dict[str, Any]:
    """A small test config; ``overrides`` replace top-level tables/keys (merged one level deep)."""
    cfg: dict[str, Any] = {
        "hostname": "mx.example.test",
        "server": {
            "listen": ["127.0.0.1:0"],
            "spool_dir": "spool",
            "trusted_networks": ["127.0.0.0/8", "::1/128"],
            "shutdown_grace": "5s",
            # Tests run as whoever runs them (often root): say so, as an admin must.
            "user": pwd.getpwuid(os.geteuid()).pw_name,
        },
        "local": {
            "domains": ["example.test", "localhost"],
            "mailbox_format": "maildir",
            "mail_dir": "mail",
            "recipient_delimiter": "+",
            "lock_timeout": "2s",
        },
        "users": {"alice": {}, "bob": {"mailbox_format": "mbox"}, "carol": {}},
        "aliases": {"postmaster": ["alice"], "team": ["alice", "bob"], "all": ["team", "carol"]},
        "queue": {"retry": ["1s"]},
        # Loopback only: no test may send DNS or SMTP traffic off this machine. Tests that
        # exercise remote delivery point these at their own DNS server and SMTP peers.
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "1s"},
        "remote": {"port": 9, "connect_timeout": "2s", "command_timeout": "5s", "data_timeout": "5s"},
        "log": {"level": "info"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(directory: Path, **overrides: Any) -> Path:
    path = directory / "monomail.toml"
    path.write_text(tomli_w.dumps(base_config(**overrides)))
    return path


def privileged_ports(n: int) -> list[int]:
    """``n`` free ports below 1024 on 127.0.0.1 (binding them needs root); the test skips if there are none."""
    found = []
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            found.append(port)
            if len(found) == n:
                return found
    pytest.skip("no free ports below 1024")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """A real monomail App running in its own event loop on a background thread."""

    def __init__(self, config: Config, clock: Any = None) -> None:
        self.config = config
        self.clock = clock
        self.app: App | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ThreadServer:
        self.thread.start()
        self.app = self.call(self._make())
        self.call(self.app.start())
        return self

    async def _make(self) -> App:
        return App(self.config, clock=self.clock) if self.clock else App(self.config)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.server.ports[0]

    def stop(self) -> None:
        if self.app is not None:
            with contextlib.suppress(Exception):
                self.call(self.app.shutdown(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """``serve(**overrides)`` → a started ThreadServer on a fresh config in tmp_path."""
    servers: list[ThreadServer] = []

    def start(clock: Any = None, **overrides: Any) -> ThreadServer:
        path = write_config(tmp_path, **overrides)
        server = ThreadServer(load(path), clock).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


class ProcessServer:
    """``monomail serve`` as a real subprocess."""

    def __init__(self, config_path: Path, port: int) -> None:
        self.config_path = config_path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config_path.parent / "server.log"

    def start(self, timeout: float = 15) -> ProcessServer:
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monomail", "serve", "-c", str(self.config_path)],
            stdout=logf, stderr=subprocess.STDOUT, cwd=self.config_path.parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.recv(100)
                if self.state_file.exists():  # written last: the server is all there
                    return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    @property
    def state_file(self) -> Path:
        """``<spool_dir>/public/monomail.pid``, which the server writes once it is started."""
        spool = tomllib.loads(self.config_path.read_text()).get("server", {}).get("spool_dir", "var/spool")
        return self.config_path.parent / spool / "public" / "monomail.pid"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def process_server(tmp_path: Path) -> Iterator[Any]:
    """``process_server(**overrides)`` → a started ProcessServer (killed at teardown)."""
    procs: list[ProcessServer] = []

    def start(**overrides: Any) -> ProcessServer:
        port = free_port()
        server_cfg = {**base_config()["server"], **overrides.pop("server", {}), "listen": [f"127.0.0.1:{port}"]}
        path = write_config(tmp_path, server=server_cfg, **overrides)
        p = ProcessServer(path, port).start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(5)


@pytest.fixture
def dns():
    """A DNS server on 127.0.0.1 (tests/peers.py) that monomail's resolver can be pointed at."""
    from peers import DNSServer

    server = DNSServer().start()
    yield server
    server.stop()


@pytest.fixture
def peers() -> Iterator[Any]:
    """``peers(host, port, **kw)`` → a started scripted SMTP peer (tests/peers.py), stopped at teardown."""
    from peers import SMTPPeer

    started: list[Any] = []

    def start(host: str, port: int, **kw: Any) -> Any:
        p = SMTPPeer(host, port, **kw).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def relay(serve: Any, dns: Any, port: int, clock: Any = None, **overrides: Any) -> ThreadServer:
    """A server whose resolver is the test DNS server and whose ``remote.port`` is ``port``
    (the peers' port); ``overrides`` as for ``serve``."""
    remote = {"port": port, **overrides.pop("remote", {})}
    return serve(clock=clock, dns={"nameservers": [dns.address], "timeout": "2s"}, remote=remote, **overrides)


class Clock:
    """Real time plus an offset that tests move forward (handed to a server as its clock)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def wait_until(pred: Any, timeout: float = 15.0) -> None:
    """Poll ``pred`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def port() -> int:
    """A free port, used on 127.0.0.x by test SMTP peers and as monomail's remote.port."""
    return free_port()


def cli(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the ``monomail`` command as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "monomail", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)
