"""The running server, seen from outside: its PID file, and how to wake it.

Job: the commands that change the spool while ``monomail serve`` may run (``sendmail``,
``deliver``, ``queue flush/hold/release/delete``) find the server by the PID file in
``server.spool_dir`` and tell it to re-read the spool (SIGUSR1). A stale PID file may
name somebody else's process, so only a process known to be monomail is signalled.

Not here: the server's own side of the PID file and the spool lock (``app``).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .settings import Config

PID_FILE = "monomail.pid"  # the running server's pid, in server.spool_dir


@dataclass
class RunningServer:
    pid: int
    host: str
    port: int
    connected: bool = False


def running_server(config: Config) -> RunningServer | None:
    """The running server by its PID file, or None."""
    try:
        pid = int((config.server.spool_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, run by another user
    listen = config.server.listen[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    if listen.port == 0:
        return None
    return RunningServer(pid, host, listen.port)


def is_monomail(pid: int) -> bool:
    try:
        return b"monomail" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def tell_server(server: RunningServer | None) -> int | None:
    """Ask a running server to read the spool now (SIGUSR1); the pid told, or None. Only a
    process known to be the server is signalled: a stale PID file may name somebody else's
    process."""
    if server is None or not (server.connected or is_monomail(server.pid)):
        return None
    try:
        os.kill(server.pid, signal.SIGUSR1)
    except OSError:
        return None
    return server.pid


def notify_server(config: Config) -> int | None:
    """Tell the running server, if there is one, to read the spool now; its pid, or None."""
    return tell_server(running_server(config))
