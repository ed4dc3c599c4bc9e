"""The child that runs a system account's recipes with that account's rights.

Job: started by ``userchild`` (``python -m monomail.asuser``, as root), it reads its
`userchild.Job` and the message from stdin, drops to the account for good (`become`:
supplementary groups, gid and uid, real, effective and saved; it checks that root
cannot be had back and refuses uid 0), and only then goes near the account's files:
``~/.procmailrc`` is read with ``accounts.read_user_file`` (a symbolic link, a file of
another owner or one writable by group or others is not used: logged, and the message
goes to the default mailbox), and run with ``userfilter``'s one `RecipeExecutor` and
`run_recipes`. Folders the recipes name are created and written by this process, as
the account, with ``mailstore``; pipes run as the account (always allowed for a system
account: they have its rights and no more), with ``filters.pipe_timeout``; ``!``
forwards and deliveries to DEFAULT (the spool mbox, which the account cannot dot-lock:
the spool is root:mail) go back to the parent in the answer, one JSON `ChildResult` on
stdout, together with this process's log records.

The environment the recipes see: HOME, LOGNAME, USER, SHELL from the passwd entry,
PATH the default, MAILDIR the home, DEFAULT the spool mbox, SENDER. The umask is 077.

Error handling: anything that goes wrong before the recipes run (a job that does not
parse, a failed drop) exits non-zero with one line on stderr: the parent counts it as
a temporary failure. The recipe engine itself never raises for what the rcfile does.

Everything this process needs is imported before the drop: the interpreter's files
may be readable by root alone.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from . import accounts, userfilter
from .userchild import ChildResult, Job

log = logging.getLogger("monomail.filters")


class _Collect(logging.Handler):
    """Keeps this process's log records for the answer."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.levelno, record.name, record.getMessage()))
        except Exception:  # noqa: BLE001 - a bad log call must not stop a delivery
            self.records.append((logging.WARNING, "monomail.asuser", "unprintable log record"))


def become(job: Job) -> None:
    """Drop to the account's uid, gid and groups for good; raise if that is not certain."""
    if job.uid == 0:
        raise PermissionError("recipes never run as root")
    if os.geteuid() == 0:
        os.setgroups(list(job.groups))
        os.setresgid(job.gid, job.gid, job.gid)
        os.setresuid(job.uid, job.uid, job.uid)
    if os.getresuid() != (job.uid, job.uid, job.uid) or os.getresgid() != (job.gid, job.gid, job.gid):
        raise PermissionError(f"could not become uid {job.uid} gid {job.gid}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PermissionError("root could be had back after the drop")
    os.umask(0o077)


def run(job: Job, message: bytes) -> userfilter.FilterOutcome:
    """The account's recipes on ``message``; not delivered when there are none to run."""
    home = Path(job.home)
    rcpath = home / ".procmailrc"
    try:
        os.chdir(home)
    except OSError as exc:
        log.warning("%s: cannot enter its home %s (%s): delivering to the default mailbox", job.name, home,
                    exc.strerror)
        return userfilter.FilterOutcome(False)
    try:
        text = accounts.read_user_file(rcpath, job.uid)
    except accounts.UnsafeFile as exc:
        log.warning("%s: %s; delivering to the default mailbox", job.name, exc)
        return userfilter.FilterOutcome(False)
    except OSError as exc:
        log.warning("%s: cannot read %s (%s): delivering to the default mailbox", job.name, rcpath, exc.strerror)
        return userfilter.FilterOutcome(False)
    if text is None:
        return userfilter.FilterOutcome(False)
    rc = userfilter.parse_recipes(job.name, text, rcpath)
    if rc is None:
        return userfilter.FilterOutcome(False)
    executor = userfilter.RecipeExecutor(
        job.name, sender=job.sender, when=job.when, lock_timeout=job.lock_timeout, pipe_timeout=job.pipe_timeout,
        allow_pipes=True, cwd=home, roots=None, handback=Path(job.mailbox))
    env = userfilter.recipe_env(job.name, home, job.mailbox, job.sender, job.shell)
    os.environ.clear()
    os.environ.update({k: v for k, v in env.items() if k in ("HOME", "LOGNAME", "USER", "SHELL", "PATH")})
    return userfilter.run_recipes(rc, message, env, executor)


def main() -> int:
    collect = _Collect()
    root = logging.getLogger("monomail")
    root.addHandler(collect)
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        job, message = Job.decode(sys.stdin.buffer.read())
        become(job)
    except Exception as exc:  # noqa: BLE001 - one line for the parent's log
        print(f"monomail.asuser: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    outcome = run(job, message)
    answer = ChildResult(outcome.delivered, outcome.handed_back, outcome.forwards, collect.records)
    sys.stdout.buffer.write(answer.encode())
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
