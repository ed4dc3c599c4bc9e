"""The boundary with the caller: the `Executor` that performs every effect, and two helpers for it.

Job: say what the engine asks of its caller (`Executor`: append to an mbox, write a
Maildir file, queue a forward, run a program, log a line) and give executors the two
checks every one of them needs: `confine` (resolve symlinks, `PermissionError`
outside the user's tree) and `read_rcfile` (the default INCLUDERC/SWITCHRC reader:
regular files only, at most `MAX_RCFILE` bytes, so a FIFO or a device cannot block
or flood a delivery).

Not here: any writer (``mailstore`` and the caller's executor, e.g. ``userfilter``),
the program sandbox (the executor's: user id, timeout, limits), deciding what to do.
This module imports nothing of ours.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

MAX_RCFILE = 256 * 1024  # bytes; INCLUDERC and SWITCHRC files are read whole


class Executor(Protocol):
    """Performs the effects the engine decides on. All blocking (a worker thread).

    Any exception means "this delivery failed": the engine logs it and goes on with
    the rcfile, procmail style. Raise `PermissionError` for a path outside what the
    user may write (`confine`).
    """

    def to_mbox(self, path: Path, message: bytes, lock: bool) -> None:
        """Append ``message`` (no From_ line; LF endings) to the mbox at ``path``,
        writing the From_ line, the quoting and the separating empty line; lock the
        mbox when ``lock``."""

    def to_maildir(self, path: Path, message: bytes) -> str:
        """Store ``message`` as a new file in the Maildir ``path`` (creating
        tmp/new/cur); return the file name."""

    def forward(self, addresses: list[str], message: bytes) -> None:
        """Queue ``message`` for ``addresses`` (the MTA's queue, not a sendmail run)."""

    def pipe(self, argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
        """Run ``argv`` (never through a shell) in the directory ``env["PWD"]`` with
        ``message`` on stdin and ``env`` as its environment; return the exit code and
        (when ``capture``) its stdout. Enforce a timeout (raise TimeoutError)."""

    def log(self, line: str) -> None:
        """One line of what the engine did, for monomail's log."""


def read_rcfile(path: Path) -> str:
    """The default INCLUDERC/SWITCHRC reader: a regular file (never a FIFO or a
    device, which could block or never end) of at most MAX_RCFILE bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > MAX_RCFILE:
                raise OSError(f"{path}: larger than {MAX_RCFILE} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def confine(path: Path, roots: Sequence[Path]) -> Path:
    """``path`` with symlinks resolved, if it lies inside one of ``roots`` (also
    resolved); else `PermissionError`. For executors: ``confine(path, [home])``."""
    real = Path(os.path.realpath(path))
    for root in roots:
        top = Path(os.path.realpath(root))
        if real == top or top in real.parents:
            return real
    raise PermissionError(f"{path}: outside {', '.join(str(r) for r in roots)}")

