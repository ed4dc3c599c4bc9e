"""Per-user recipes at local delivery: the glue between ``procmail`` (decisions) and disk.

Job: for one local delivery, load the user's recipe file (parsed once, re-parsed when it
changes) and run it (`run_recipes`) with the one `RecipeExecutor`, which writes mbox
files and Maildir folders with ``mailstore`` (the same locking and fsync as every other delivery), runs ``|`` pipes as
argument vectors with a timeout (only for users in ``filters.allow_pipes``), and
collects ``!`` forwards, which the caller hands to the queue as a new message. Blocking:
the deliverer runs `apply` in a worker thread. A system account's recipes run with the
same `RecipeExecutor` and `run_recipes`, in the ``asuser`` child with the account's rights
(not confined there: the system's permissions are the account's own).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import mailstore, procmail
from .settings import Config, User

log = logging.getLogger("monomail.filters")


PATH = "/usr/local/bin:/usr/bin:/bin"  # a recipe's PATH


@dataclass
class FilterOutcome:
    delivered: bool  # the recipes (or their fall-through to DEFAULT) stored the message
    forwards: list[tuple[list[str], bytes]] = field(default_factory=list)  # (addresses, message)
    actions: tuple[str, ...] = ()
    handed_back: list[bytes] = field(default_factory=list)  # copies for the caller's own mailbox write


class RecipeExecutor:
    """The one `procmail.Executor`: in this process for a TOML user (writes confined to
    ``roots``), and in the ``asuser`` child for a system account (``roots`` None: the
    child runs with the account's own rights, so the system decides what it may write).

    ``handback``: a mailbox this process must not write itself (an account's spool mbox,
    whose folder only root and group mail may lock in); a delivery to it is kept in
    `handed_back` for the caller, which writes it and counts it as delivered."""

    def __init__(self, name: str, *, sender: str, when: float, lock_timeout: float, pipe_timeout: float,
                 allow_pipes: bool, cwd: Path, roots: Sequence[Path] | None = None,
                 handback: Path | None = None) -> None:
        self.name = name
        self.sender = sender
        self.when = when
        self.lock_timeout = lock_timeout
        self.pipe_timeout = pipe_timeout
        self.allow_pipes = allow_pipes
        self.cwd = cwd
        self.roots = None if roots is None else [r.resolve() for r in roots]
        self.handback = None if handback is None else os.path.realpath(handback)
        self.forwards: list[tuple[list[str], bytes]] = []
        self.handed_back: list[bytes] = []

    def _check(self, path: Path) -> Path:
        if self.roots is None:
            return Path(os.path.abspath(path))
        return procmail.confine(path, self.roots)  # PermissionError outside home and mailbox

    def read_file(self, path: Path) -> str:
        """INCLUDERC and SWITCHRC files (inside ``roots`` when confined)."""
        return procmail.read_rcfile(self._check(path))

    def to_mbox(self, path: Path, message: bytes, lock: bool) -> None:
        real = self._check(path)
        if self.handback is not None and os.path.realpath(real) == self.handback:
            self.handed_back.append(message)
            return
        item = (self.sender, self.when, [mailstore.mbox_quote(message)])
        mailstore.deliver_mbox(real, [item], self.lock_timeout)

    def to_maildir(self, path: Path, message: bytes) -> str:
        return mailstore.deliver_maildir(self._check(path), [message])

    def forward(self, addresses: list[str], message: bytes) -> None:
        self.forwards.append((list(addresses), message))

    def pipe(self, argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
        if not self.allow_pipes:
            raise PermissionError(f"pipes are not allowed for {self.name} (filters.allow_pipes)")
        try:
            done = subprocess.run(
                argv, input=message, env=env, cwd=env.get("PWD") or str(self.cwd),
                stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=self.pipe_timeout, check=False, close_fds=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{argv[0]}: no exit after {self.pipe_timeout:.0f}s, killed") from exc
        return done.returncode, done.stdout or b""

    def log(self, line: str) -> None:
        log.info("%s: %s", self.name, line)


def recipe_env(name: str, home: Path, default: str, sender: str, shell: str = "/bin/sh") -> dict[str, str]:
    """The variables a user's recipes start with (procmail's, as a login would have them)."""
    return {"HOME": str(home), "LOGNAME": name, "USER": name, "MAILDIR": str(home), "DEFAULT": default,
            "SENDER": sender, "SHELL": shell, "PATH": PATH}


def parse_recipes(name: str, text: str, where: Path) -> procmail.Rcfile | None:
    """The parsed rcfile; None (logged) when it does not parse: the default mailbox gets the mail."""
    try:
        return procmail.parse(text, str(where))
    except procmail.RecipeError as exc:
        log.error("%s: recipe file broken, delivering to the default mailbox: %s", name, exc)
        return None


def run_recipes(rc: procmail.Rcfile, message: bytes, env: dict[str, str], executor: RecipeExecutor) -> FilterOutcome:
    """Run ``rc`` on ``message`` with ``executor``; every recipe error is logged. Blocking."""
    result = procmail.run(rc, message, env, executor, allow_pipes=executor.allow_pipes, sender=executor.sender,
                          when=executor.when, read_file=executor.read_file)
    for error in result.errors:
        log.warning("%s: %s", executor.name, error)
    return FilterOutcome(result.delivered, executor.forwards, result.actions, executor.handed_back)


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
        executor = RecipeExecutor(
            user.name, sender=sender, when=time.time() if when is None else when,
            lock_timeout=self.config.local.lock_timeout, pipe_timeout=self.config.filters.pipe_timeout,
            allow_pipes=user.name in self.config.filters.allow_pipes, cwd=user.home, roots=[user.home, user.path])
        default = f"{user.path}/" if user.mailbox_format == "maildir" else str(user.path)
        user.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return run_recipes(rc, message, recipe_env(user.name, user.home, default, sender), executor)
