"""``monomail status``: is the running server serving? A health check that means something.

Job: exit 0 only when all of these hold, and print one line saying what was checked:

1. the state file (``<spool_dir>/public/monomail.pid``, ``control``) names a live process;
2. that server answers its SMTP banner (220) on its first listener (the first of
   ``server.listen``, else of ``submission.listen``; a wildcard address is asked on
   loopback) within ``--timeout`` seconds, connect included: a hung or stopped
   (SIGSTOP) process accepts the connection in the kernel but never greets;
3. its queue runner is alive: the runner's heartbeat file (``heartbeat``) was touched
   less than ``heartbeat.STALE_AFTER`` seconds ago.

Otherwise it exits 1 with one line on stderr saying which check failed and why (not
running; no banner in time; a banner that is not 220; a stale runner). A configuration
that cannot be read is the command's usual exit 2. This is what the Dockerfile's
HEALTHCHECK runs. The probe says QUIT after the banner; it sends nothing else.

Not here: the server's state file and heartbeat (``control``, ``heartbeat``, ``app``).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import load
from .control import pid_file, read_state, running_server
from .heartbeat import STALE_AFTER, age, heartbeat_file
from .settings import Config

DEFAULT_TIMEOUT = 3.0  # seconds for the banner, connect included (Docker's HEALTHCHECK allows 5)
MAX_BANNER = 4096  # bytes read for the greeting
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    line: str


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``monomail status`` under the ``monomail`` command's subparsers."""
    p = sub.add_parser("status", parents=[common],
                       help="exit 0 if the running server answers its SMTP banner and its queue runner lives")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the banner (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    health = check(load(Path(args.config)), max(0.1, args.timeout))
    if health.ok:
        print(f"monomail status: {health.line}")
        return 0
    print(f"monomail status: {health.line}", file=sys.stderr)
    return 1


def first_listener(config: Config) -> tuple[str, int] | None:
    """Where the banner is asked for: the first MX listener, else the first submission one."""
    for addresses in (config.server.listen, config.submission.listen):
        if addresses:
            addr = addresses[0]
            return WILDCARDS.get(addr.host, addr.host), addr.port
    return None


def banner(host: str, port: int, timeout: float) -> str:
    """The server's greeting's last line, within ``timeout`` (connect included). Raises
    TimeoutError, OSError; ValueError for a connection closed before a whole greeting."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        data = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(MAX_BANNER)
            if not chunk:
                raise ValueError("connection closed before a greeting")
            data += chunk
            lines = data.split(b"\r\n")
            done = [ln for ln in lines[:-1] if ln[3:4] != b"-"]
            if done:
                with contextlib.suppress(OSError):
                    sock.sendall(b"QUIT\r\n")
                return done[0].decode("utf-8", "replace")
            if len(data) > MAX_BANNER:
                raise ValueError("greeting too long")


def check(config: Config, timeout: float = DEFAULT_TIMEOUT) -> Health:
    state = read_state(config)
    if state is None:
        return Health(False, f"not running: no state file {pid_file(config)}")
    if running_server(config) is None:
        return Health(False, f"not running: pid {state.pid} (from {pid_file(config)}) is gone")
    target = first_listener(config)
    if target is None:
        return Health(False, "no SMTP listener configured (server.listen, submission.listen) to ask")
    host, port = target
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    started = time.monotonic()
    try:
        greeting = banner(host, port, timeout)
    except TimeoutError:
        return Health(False, f"pid {state.pid}: no SMTP banner on {where} within {timeout:g}s "
                             "(hung, overloaded or stopped)")
    except (OSError, ValueError) as exc:
        return Health(False, f"pid {state.pid}: no SMTP banner on {where}: {exc}")
    took = time.monotonic() - started
    if not greeting.startswith("220"):
        return Health(False, f"pid {state.pid}: {where} answered {greeting[:200]!r}, not 220")
    beat = age(config)
    if beat is None:
        return Health(False, f"pid {state.pid}: banner ok on {where}, but the queue runner has no heartbeat "
                             f"({heartbeat_file(config)} is missing)")
    if beat > STALE_AFTER:
        return Health(False, f"pid {state.pid}: banner ok on {where}, but the queue runner is not alive "
                             f"(last heartbeat {beat:.0f}s ago, more than {STALE_AFTER:g}s)")
    return Health(True, f"ok: pid {state.pid} answered 220 on {where} in {took * 1000:.0f} ms; "
                        f"queue runner beat {beat:.0f}s ago")
