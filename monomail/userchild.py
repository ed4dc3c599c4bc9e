"""A system account's recipes, run in a child process with that account's rights.

Job: the parent's side of ``python -m monomail.asuser``. `run_recipes_as` starts the
child (as root: the interpreter and monomail may be readable by root alone, so the
child reads its job and loads its code first, then drops to the account for good
before it touches anything of the user's: see ``asuser``), hands it a `Job` (one JSON
line: who the account is, its mailbox, the envelope sender, the timeouts) and the
message on stdin, and reads one JSON `ChildResult` from its stdout: whether the
recipes stored the message, the copies they delivered to DEFAULT (the spool mbox,
which only the parent may lock and write: it is handed back), the ``!`` forwards, and
the child's log records, which are logged here under their own logger names.

Rights: nothing of the account's (``~/.procmailrc``, folders, pipes) is touched here;
the child does all of it as the account. The child's answer is treated as the user's
own input: sizes are capped, forward addresses must be plain printable words, log text
is made printable and cut short.

Error handling: a child that cannot start, exits non-zero, answers with anything but
a well-formed result, or runs past `child_timeout` (its whole process group is killed:
its pipes with it) raises `RecipeChildFailed`; the deliverer counts that as a temporary
failure (4.3.0), so the message stays queued and is never lost.

Not here: the child itself (``asuser``), the spool mbox write (``deliver`` with
``mailstore``'s owned open), the recipe engine (``procmail``, ``userfilter``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .settings import Account, Config

log = logging.getLogger("monomail.userchild")

MAX_CHILDREN = 8  # recipe children running at once per deliverer (each is a Python process)
MAX_LOG_RECORDS = 200  # lines of the child's log relayed here
MAX_LOG_TEXT = 2000  # characters per relayed line
MAX_ADDRESS = 320  # characters in a forward address (RFC 5321 path limits, with room)
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the monomail package lives
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from monomail.asuser import main; sys.exit(main())"


class RecipeChildFailed(Exception):
    """The child did not give a usable answer (a temporary delivery failure)."""


@dataclass(frozen=True, slots=True)
class Job:
    """What the child needs: who, where the mailbox is, and the message's envelope."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str
    mailbox: str  # DEFAULT: the spool mbox (handed back, never written by the child)
    sender: str
    when: float
    lock_timeout: float
    pipe_timeout: float

    @classmethod
    def for_account(cls, account: Account, sender: str, when: float, config: Config) -> Job:
        if account.home is None:
            raise ValueError(f"{account.name} has no home directory: no recipes")
        return cls(account.name, account.uid, account.gid, tuple(account.groups), str(account.home), account.shell,
                   str(account.mailbox), sender, when, config.local.lock_timeout, config.filters.pipe_timeout)

    def encode(self, message: bytes) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8") + b"\n" + message

    @classmethod
    def decode(cls, raw: bytes) -> tuple[Job, bytes]:
        head, _, message = raw.partition(b"\n")
        fields = json.loads(head)
        fields["groups"] = tuple(fields["groups"])
        return cls(**fields), message


@dataclass
class ChildResult:
    """The child's answer."""

    delivered: bool  # the recipes (or the fall-through to DEFAULT) stored the message
    handed_back: list[bytes] = field(default_factory=list)  # copies for the spool mbox
    forwards: list[tuple[list[str], bytes]] = field(default_factory=list)
    logs: list[tuple[int, str, str]] = field(default_factory=list)  # (level, logger, text)

    def encode(self) -> bytes:
        return json.dumps({
            "delivered": self.delivered,
            "handed_back": [base64.b64encode(m).decode("ascii") for m in self.handed_back],
            "forwards": [[to, base64.b64encode(m).decode("ascii")] for to, m in self.forwards],
            "logs": self.logs[:MAX_LOG_RECORDS],
        }).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes) -> ChildResult:
        """Parse an answer that came from the user's side (anything may be in it)."""
        try:
            obj: Any = json.loads(raw)
            delivered = obj["delivered"]
            handed = [base64.b64decode(m, validate=True) for m in obj["handed_back"]]
            forwards = [(list(to), base64.b64decode(m, validate=True)) for to, m in obj["forwards"]]
            logs = [(int(level), str(name), str(text)) for level, name, text in obj["logs"][:MAX_LOG_RECORDS]]
        except (ValueError, TypeError, KeyError) as exc:
            raise RecipeChildFailed(f"unreadable answer: {type(exc).__name__}: {exc}") from None
        if not isinstance(delivered, bool):
            raise RecipeChildFailed("unreadable answer: 'delivered' is not a boolean")
        for to, _ in forwards:
            if not to or not all(isinstance(a, str) and _plain_address(a) for a in to):
                raise RecipeChildFailed(f"unusable forward addresses: {str(to)[:200]!r}")
        return cls(delivered, handed, forwards, logs)


def _plain_address(a: str) -> bool:
    return 0 < len(a) <= MAX_ADDRESS and all(c.isprintable() and not c.isspace() for c in a)


def child_timeout(config: Config) -> float:
    """How long the child may take in all: room for a few pipes and mbox locks."""
    return 4 * config.filters.pipe_timeout + 2 * config.local.lock_timeout + 5.0


def relay_logs(name: str, records: list[tuple[int, str, str]]) -> None:
    """Log the child's records here (printable, cut short, at most ERROR)."""
    for level, logger, text in records:
        where = logger if logger.startswith("monomail") and logger.isprintable() else "monomail.asuser"
        shown = "".join(c if c.isprintable() else "?" for c in text[:MAX_LOG_TEXT])
        logging.getLogger(where[:80]).log(min(max(level, logging.DEBUG), logging.ERROR), "[%s] %s", name, shown)


async def run_recipes_as(account: Account, message: bytes, sender: str, when: float, config: Config) -> ChildResult:
    """Run ``account``'s ``~/.procmailrc`` on ``message`` in a child with its rights.
    Raises `RecipeChildFailed` (temporary) when the child gives no usable answer."""
    job = Job.for_account(account, sender, when, config)
    limit = 32 * len(message) + (1 << 20)  # answer size: a few copies of the message at most
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-B", "-c", _BOOT, _ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, cwd="/", start_new_session=True, close_fds=True)
    except OSError as exc:
        raise RecipeChildFailed(f"cannot start the recipe child: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(job.encode(message)), child_timeout(config))
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        raise RecipeChildFailed(f"recipes of {account.name} took longer than {child_timeout(config):.0f}s: "
                                "killed") from None
    except BaseException:
        _kill_group(proc.pid)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        _kill_group(proc.pid)
        why = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise RecipeChildFailed(f"recipe child of {account.name} exited with {proc.returncode}: {why[0][:500]}")
    if len(out) > limit:
        raise RecipeChildFailed(f"recipe child of {account.name} answered with {len(out)} bytes")
    result = ChildResult.decode(out)
    relay_logs(account.name, result.logs)
    return result


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
