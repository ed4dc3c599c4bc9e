"""The running server, seen from outside: the public corner of the spool, and how to wake it.

Job: the commands that change the spool or hand mail over while ``monomail serve`` may
run (``sendmail``, ``mailq``, ``deliver``, ``queue flush/hold/release/delete``) find the
server by its state file, and the server makes the folder they find it in. The spool
itself is mode 0711 (traversable, not listable: its entries stay the server's, 0600);
its one public corner, made by the server at start with explicit modes (never the
umask), is::

    <spool_dir>/public/              0755  the server's user
    <spool_dir>/public/monomail.pid  0644  the state file: the pid, then "key value" lines
    <spool_dir>/public/submit        0666  UNIX socket: SMTP for local submission
    <spool_dir>/public/showq         0666  UNIX socket: the queue listing (mailq)
    <spool_dir>/public/maildrop/     1733  the drop folder (``maildrop``), written by anyone

The state file's first line is the pid alone (``kill $(cat ...)`` works); then
``socket``, ``showq`` and ``uid`` (the server process's uid, which may set any sender).
`tell_server` wakes a server with SIGUSR1; a stale state file may name somebody else's
process, so only a process known to be monomail is signalled.

Reload (``monomail reload``, `ask_reload`): SIGHUP, then the server's answer in
``<spool_dir>/public/reload.result`` (0600: only the server's user and root, the ones who
may signal it, read it): its pid, when it began reading the config file (CLOCK_MONOTONIC,
one clock for every process of the host), ``ok`` or ``refused`` with the one-line error,
and any warnings. An answer counts only when that reading began after the signal was
sent, so it saw the file as the caller left it, whatever reload came before.

Not here: the server's listeners on those sockets (``server``, ``localsubmit``), the drop
folder's files (``maildrop``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket as socketlib
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .safeio import write_file
from .settings import Config

PUBLIC_DIR = "public"
PID_FILE = "monomail.pid"  # the state file, in <spool_dir>/public
SOCKET = "submit"  # SMTP for local submission
SHOWQ = "showq"  # the queue listing
MAILDROP = "maildrop"
RELOAD_RESULT = "reload.result"  # the server's answer to SIGHUP
SPOOL_MODE = 0o711
PUBLIC_MODE = 0o755
STATE_MODE = 0o644
SOCKET_MODE = 0o666
MAILDROP_MODE = 0o1733  # anyone creates; nobody lists; the sticky bit: nobody removes others' files


def public_dir(config: Config) -> Path:
    return config.server.spool_dir / PUBLIC_DIR


def pid_file(config: Config) -> Path:
    return public_dir(config) / PID_FILE


def maildrop_dir(config: Config) -> Path:
    return public_dir(config) / MAILDROP


@dataclass
class RunningServer:
    pid: int
    socket: Path | None = None  # SMTP for local submission
    showq: Path | None = None  # the queue listing
    uid: int | None = None  # the server process's uid
    connected: bool = False  # a client of ours has spoken with it: it is monomail


def read_state(config: Config) -> RunningServer | None:
    """What the state file says (whether or not that process lives), or None."""
    try:
        lines = pid_file(config).read_text(encoding="utf-8").splitlines()
        pid = int(lines[0].strip())
    except (OSError, ValueError, IndexError, UnicodeError):
        return None
    if pid <= 0:
        return None
    state = RunningServer(pid)
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        if key in ("socket", "showq") and value.startswith("/"):
            setattr(state, key, Path(value))
        elif key == "uid" and value.isdigit():
            state.uid = int(value)
    return state


def running_server(config: Config) -> RunningServer | None:
    """The running server by its state file, or None when that process is gone."""
    state = read_state(config)
    if state is None:
        return None
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, run by another user
    return state


def make_public(config: Config) -> Path:
    """The public corner, made (or repaired) by the server at start with explicit modes, as
    whoever the server runs as; the drop folder's path. Raises OSError, and
    ``NotADirectoryError`` for something that is not a real folder in the way."""
    spool = config.server.spool_dir
    os.chmod(spool, SPOOL_MODE)  # made 0700 by older releases and by `Spool.create`
    public = public_dir(config)
    drop = maildrop_dir(config)
    for folder, mode in ((public, PUBLIC_MODE), (drop, MAILDROP_MODE)):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise NotADirectoryError(f"{folder} is not a folder of the server's user")
        os.chmod(folder, mode)
    return drop


def write_state(config: Config, *, socket: Path | None, showq: Path | None) -> None:
    """The state file every user can read (0644), written safely."""
    lines = [str(os.getpid())]
    if socket is not None:
        lines.append(f"socket {os.path.abspath(socket)}")
    if showq is not None:
        lines.append(f"showq {os.path.abspath(showq)}")
    lines.append(f"uid {os.geteuid()}")
    write_file(pid_file(config), ("\n".join(lines) + "\n").encode(), mode=STATE_MODE)


def remove_state(config: Config) -> None:
    """At shutdown: the state file, if it is still ours."""
    state = read_state(config)
    if state is not None and state.pid == os.getpid():
        with contextlib.suppress(OSError):
            pid_file(config).unlink()


def ask_showq(config: Config, timeout: float = 15.0) -> str | None:
    """The queue listing from the running server's showq socket, or None when no server
    answers there (blocking, at most ``timeout`` seconds)."""
    state = running_server(config)
    if state is None or state.showq is None:
        return None
    chunks = []
    try:
        with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(state.showq))
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    text = b"".join(chunks).decode("utf-8", "replace")
    return text if text.endswith("\n") else None  # a listing cut short is no listing


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


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What the server made of one reading of its config file."""

    pid: int
    started: int  # time.monotonic_ns() when the server began reading the file
    ok: bool
    error: str = ""  # refused: the one line check-config prints ("config error: key: message")
    warnings: tuple[str, ...] = ()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def write_reload_result(config: Config, result: ReloadResult) -> None:
    lines = [str(result.pid), f"started {result.started}", "ok" if result.ok else "refused"]
    if result.error:
        lines.append(f"error {_one_line(result.error)}")
    lines += [f"warning {_one_line(w)}" for w in result.warnings]
    write_file(public_dir(config) / RELOAD_RESULT, ("\n".join(lines) + "\n").encode(), mode=0o600)


def read_reload_result(config: Config) -> ReloadResult | None:
    try:
        lines = (public_dir(config) / RELOAD_RESULT).read_text(encoding="utf-8").splitlines()
        pid, started, verdict = int(lines[0]), int(lines[1].removeprefix("started ")), lines[2]
    except (OSError, ValueError, IndexError, UnicodeError):
        return None
    error = next((line[6:] for line in lines[3:] if line.startswith("error ")), "")
    warnings = tuple(line[8:] for line in lines[3:] if line.startswith("warning "))
    return ReloadResult(pid, started, verdict == "ok", error, warnings)


def ask_reload(config: Config, timeout: float = 30.0) -> ReloadResult | str:
    """SIGHUP to the running server and its answer (blocking, at most ``timeout``
    seconds), or why there is none (a one-line reason)."""
    server = running_server(config)
    if server is None or not is_monomail(server.pid):
        return f"no monomail server is running (state file {pid_file(config)})"
    sent = time.monotonic_ns()
    try:
        os.kill(server.pid, signal.SIGHUP)
    except OSError as exc:
        return f"cannot signal the server (pid {server.pid}): {exc.strerror}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = read_reload_result(config)
        if result is not None and result.pid == server.pid and result.started >= sent:
            return result
        try:
            os.kill(server.pid, 0)
        except ProcessLookupError:
            return f"the server (pid {server.pid}) ended before it answered"
        except PermissionError:
            pass
        time.sleep(0.05)
    return f"the server (pid {server.pid}) did not answer within {timeout:.0f}s"
