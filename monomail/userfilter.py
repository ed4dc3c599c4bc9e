"""Per-user recipes at local delivery: the glue between ``procmail`` (decisions) and disk.

Job: for one local delivery, load the user's recipe file (parsed once, re-parsed when it
changes), run it with an `Executor` that writes mbox files and Maildir folders with
``mailstore`` (the same locking and fsync as every other delivery), runs ``|`` pipes as
argument vectors with a timeout (only for users in ``filters.allow_pipes``), and
collects ``!`` forwards, which the caller hands to the queue as a new message. Blocking:
the deliverer runs `apply` in a worker thread.

Security stance (DESIGN invariant 4): the recipe file's path comes from config, never
from the message. A recipe may write only inside the user's own home and mail folder;
any other path is refused (PermissionError), which the engine treats as a failed
delivery, so the message falls through to the default mailbox. Pipes never go through
a shell.

Error handling: a recipe file that does not parse is logged and the message goes to
the default mailbox — never lost, never bounced for the user's typo. A hanging pipe is
killed after ``filters.pipe_timeout``. If even the default mailbox cannot be written,
the error propagates and the delivery is deferred (temporary).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import mailstore, procmail
from .settings import Config, User

log = logging.getLogger("monomail.filters")


@dataclass
class FilterOutcome:
    delivered: bool  # the recipes (or their fall-through to DEFAULT) stored the message
    forwards: list[tuple[list[str], bytes]] = field(default_factory=list)  # (addresses, message)
    actions: tuple[str, ...] = ()


class _Executor:
    def __init__(self, user: User, config: Config, sender: str, when: float) -> None:
        self.user = user
        self.config = config
        self.sender = sender
        self.when = when
        self.forwards: list[tuple[list[str], bytes]] = []
        self.roots = [user.home.resolve(), user.path.resolve()]

    def _check(self, path: Path) -> Path:
        return procmail.confine(path, self.roots)  # PermissionError outside home and mailbox

    def to_mbox(self, path: Path, message: bytes, lock: bool) -> None:
        real = self._check(path)
        item = (self.sender, self.when, [mailstore.mbox_quote(message)])
        mailstore.deliver_mbox(real, [item], self.config.local.lock_timeout)

    def to_maildir(self, path: Path, message: bytes) -> str:
        return mailstore.deliver_maildir(self._check(path), [message])

    def forward(self, addresses: list[str], message: bytes) -> None:
        self.forwards.append((list(addresses), message))

    def pipe(self, argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
        if self.user.name not in self.config.filters.allow_pipes:
            raise PermissionError(f"pipes are not allowed for {self.user.name} (filters.allow_pipes)")
        try:
            done = subprocess.run(
                argv, input=message, env=env, cwd=env.get("PWD") or str(self.user.home),
                stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=self.config.filters.pipe_timeout, check=False, close_fds=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{argv[0]}: no exit after {self.config.filters.pipe_timeout:.0f}s, killed") from exc
        return done.returncode, done.stdout or b""

    def log(self, line: str) -> None:
        log.info("%s: %s", self.user.name, line)


class UserFilters:
    """Parsed recipe files, cached by modification time."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._cache: dict[Path, tuple[tuple[int, int], procmail.Rcfile | procmail.RecipeError]] = {}
        self._lock = threading.Lock()

    def recipes(self, user: User) -> procmail.Rcfile | None:
        """The user's parsed recipes; None when filtering is off, there is no file, or it is broken."""
        if not self.config.filters.enabled:
            return None
        try:
            st = os.stat(user.recipes)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(user.recipes)
        if hit is None or hit[0] != stamp:
            try:
                parsed: procmail.Rcfile | procmail.RecipeError = procmail.parse(
                    user.recipes.read_text(encoding="utf-8", errors="replace"), str(user.recipes))
            except procmail.RecipeError as exc:
                parsed = exc
            except OSError as exc:
                log.warning("%s: cannot read %s: %s", user.name, user.recipes, exc)
                return None
            with self._lock:
                self._cache[user.recipes] = (stamp, parsed)
            hit = (stamp, parsed)
        if isinstance(hit[1], procmail.RecipeError):
            log.error("%s: recipe file broken, delivering to the default mailbox: %s", user.name, hit[1])
            return None
        return hit[1]

    def apply(self, user: User, message: bytes, sender: str, when: float | None = None) -> FilterOutcome | None:
        """Run the user's recipes on ``message`` (delivery headers included). None: no
        recipes apply, deliver as usual. Blocking (worker thread)."""
        rc = self.recipes(user)
        if rc is None:
            return None
        executor = _Executor(user, self.config, sender, time.time() if when is None else when)
        default = f"{user.path}/" if user.mailbox_format == "maildir" else str(user.path)
        env = {
            "HOME": str(user.home), "LOGNAME": user.name, "USER": user.name, "MAILDIR": str(user.home),
            "DEFAULT": default, "SENDER": sender, "SHELL": "/bin/sh", "PATH": "/usr/local/bin:/usr/bin:/bin",
        }
        user.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        result = procmail.run(
            rc, message, env, executor, allow_pipes=user.name in self.config.filters.allow_pipes, sender=sender,
            when=executor.when, read_file=lambda p: procmail.read_rcfile(procmail.confine(p, executor.roots)),
        )
        for error in result.errors:
            log.warning("%s: %s", user.name, error)
        return FilterOutcome(result.delivered, executor.forwards, result.actions)
