"""The queue runner's heartbeat: a file in the spool's public corner whose mtime says it lives.

Job: ``<spool_dir>/public/heartbeat`` (0644, the server's user) is made at start; the
queue runner, which wakes at least every few seconds (``queue.HEARTBEAT``), calls
`Heartbeat.beat` each time it does, and that touches the file's mtime (at most once a
second: one ``utime``, no data written, nothing fsync'd). `age` is how long ago that
was, read by ``monomail status`` from any process; older than `STALE_AFTER` means
the runner (or the whole event loop) is not running.

Error handling: a beat that cannot touch the file makes it again; if that fails too it
is logged once (and again after it worked), never raised: the runner must not stop over
its heartbeat. Not here: the check itself (``statuscmd``), the runner (``queue``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .control import public_dir
from .settings import Config

log = logging.getLogger("monomail.queue")

HEARTBEAT_FILE = "heartbeat"
MODE = 0o644
THROTTLE = 1.0  # seconds between two touches
STALE_AFTER = 20.0  # seconds without a beat: the runner is not alive (it beats every 5 s)


def heartbeat_file(config: Config) -> Path:
    return public_dir(config) / HEARTBEAT_FILE


def age(config: Config, now: float | None = None) -> float | None:
    """Seconds since the runner's last beat, or None when there is no heartbeat file."""
    try:
        mtime = os.stat(heartbeat_file(config), follow_symlinks=False).st_mtime
    except OSError:
        return None
    return max(0.0, (time.time() if now is None else now) - mtime)


class Heartbeat:
    """The runner's side: `beat` as often as you like."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = float("-inf")
        self._failing = False

    def create(self) -> None:
        """Make (or touch) the file, mode 0644, never through a symlink. Raises OSError."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, MODE)
        try:
            os.fchmod(fd, MODE)
            os.utime(fd)
        finally:
            os.close(fd)
        self._last = time.monotonic()

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last < THROTTLE:
            return
        self._last = now
        try:
            try:
                os.utime(self.path, follow_symlinks=False)
            except FileNotFoundError:
                self.create()
        except OSError as exc:
            if not self._failing:
                log.warning("heartbeat %s: cannot touch it: %s (monomail status will say the runner is stale)",
                            self.path, exc)
            self._failing = True
            return
        if self._failing:
            log.info("heartbeat %s: touched again", self.path)
            self._failing = False
