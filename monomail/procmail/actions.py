"""What a matched recipe does: write a folder, forward, run a program or a filter.

Job: the actions of procmailrc(5) (RECIPES, the action line; procmailex(5)), each
a function of the run's `RunState` that returns whether it succeeded, so the engine
can decide what comes next (a success ends the rcfile unless ``c``; a failure falls
through). `store` writes one folder: ``/dev/null``, an mbox file (with the lock the
recipe asked for) or a Maildir (``name/``), creating only the folder itself, as
procmail does, relative to MAILDIR; `folder` writes the recipe's folder list (the
parts ``h`` and ``b`` select); `forward` queues ``! addresses``; `program` runs
``| cmd`` (delivering), an ``f`` filter (the message is replaced by its output) or a
``VAR=| cmd`` capture (the variable is set; the engine then applies its special
meaning). Every effect goes through the `Executor`; any exception from it is a failed
delivery, logged, never raised. Differences 3 to 8 and 12 in the package docstring
are decided here.

Not here: whether the recipe matched, and what success or failure means for the rest
of the rcfile (``engine``); the writers (the caller's executor).
"""

from __future__ import annotations

import os

from .message import skip_from, terminate
from .state import RunState
from .syntax import Recipe


def folder(run: RunState, r: Recipe, flags: frozenset[str]) -> bool:
    """A folder recipe: the first folder must take the message; more Maildirs after a
    Maildir each get a copy, other extra names are skipped (difference 7)."""
    words = run.expand_words(r.action)
    if not words:
        run.error(f"line {r.line}: the folder name expands to nothing")
        return False
    if "f" in flags:
        run.note(f"line {r.line}: 'f' on a folder ignored (the whole message is written)")
        data, at_start = run.mail, True
    else:
        data, at_start = run.part(flags)
    first, extra = words[0], words[1:]
    if not store(run, first, data, at_start, lock=r.lock, what=f"line {r.line}"):
        return False
    for name in extra:
        if first.endswith("/") and name.endswith("/"):
            store(run, name, data, at_start, lock=False, what=f"line {r.line}")
        else:
            run.note(f"line {r.line}: extra folder {name!r} skipped")
    return True


def store(run: RunState, name: str, data: bytes, at_start: bool, *, lock: bool, what: str) -> bool:
    """Write ``data`` to the folder ``name`` through the executor; True if done."""
    if name == "/dev/null":
        run.set_lastfolder(name)
        run.note(f"{what}: discarded (/dev/null)")
        return True
    path = run.path(name)
    payload = skip_from(data) if at_start else data
    try:
        if name.endswith("/."):
            raise ValueError("MH folders (name/.) are not supported")
        if not os.path.isdir(path.parent):  # as procmail: only the folder itself is created
            raise FileNotFoundError(f"no directory {path.parent}")
        if name.endswith("/"):
            fname = run.executor.to_maildir(path, payload)
            run.set_lastfolder(f"{name.rstrip('/')}/new/{fname}")
            run.note(f"{what}: maildir {path}/ {fname}")
        else:
            if os.path.isdir(path):
                raise IsADirectoryError(f"{path} is a directory (end the name with / for a Maildir)")
            if payload.endswith(b"\n\n"):
                payload = payload[:-1]  # the mbox separator is the executor's
            run.executor.to_mbox(path, payload, lock)
            run.set_lastfolder(name)
            run.note(f"{what}: mbox {path}")
    except Exception as exc:  # noqa: BLE001 - any executor failure is a failed delivery
        run.error(f"{what}: delivery to {name} failed: {type(exc).__name__}: {exc}")
        return False
    return True


def forward(run: RunState, r: Recipe, flags: frozenset[str]) -> bool:
    """``! addresses``: the part ``h``/``b`` select, without the From_ line, to the
    executor's queue (difference 4)."""
    addresses = run.expand_words(r.action)
    if "f" in flags:
        run.note(f"line {r.line}: 'f' on a forward ignored")
    if not addresses:
        run.error(f"line {r.line}: '!' expands to no address")
        return False
    data, at_start = run.part(flags)
    if at_start:
        data = skip_from(data)
    if "r" not in flags:
        data = terminate(data)
    try:
        run.executor.forward(list(addresses), data)
    except Exception as exc:  # noqa: BLE001 - any executor failure is a failed delivery
        run.error(f"line {r.line}: forward to {', '.join(addresses)} failed: {type(exc).__name__}: {exc}")
        return False
    run.set_lastfolder(" ".join([run.vars.get("SENDMAIL", ""), run.vars.get("SENDMAILFLAGS", ""),
                                  *addresses]).strip())
    run.note(f"line {r.line}: forwarded to {', '.join(addresses)}")
    return True


def program(run: RunState, r: Recipe, flags: frozenset[str]) -> tuple[bool, str | None]:
    """``| cmd`` (delivering), ``f`` filters and ``VAR=| cmd`` captures: whether it
    succeeded, and the value a capture stored in its variable (else None)."""
    filtering = "f" in flags and not r.capture
    what = f"line {r.line}: " + ("filter" if filtering else "capture" if r.capture else "pipe")
    if "c" in flags and (filtering or r.capture):
        run.note(f"line {r.line}: 'c' on a filter ignored")
    if not run.allow_pipes:
        run.error(f"{what} not run (programs are disabled): |{r.action.strip()}")
        return False, None
    argv = run.argv(r.action, what)
    if not argv:
        return False, None
    data, _ = run.part(flags)
    if "r" not in flags:
        data = terminate(data)
    wait = bool(flags & {"w", "W"}) or r.lock
    try:
        code, out = run.executor.pipe(argv, data, run.env(), filtering or bool(r.capture))
    except BrokenPipeError as exc:
        if "i" in flags and not wait and not filtering:
            run.note(f"{what} {argv[0]}: closed its input early (ignored, 'i')")
            return True, None
        run.error(f"{what} {argv[0]} failed: {type(exc).__name__}: {exc}")
        return False, None
    except Exception as exc:  # noqa: BLE001 - any executor failure is a failed delivery
        run.error(f"{what} {argv[0]} failed: {type(exc).__name__}: {exc}")
        return False, None
    run.lastexit = code
    if wait and code:
        run.error(f"{what} {argv[0]} exited {code}" + (": message unchanged" if filtering else ""))
        return False, None
    if r.capture:
        value = out.decode("utf-8", "surrogateescape")
        value = value[:-1] if value.endswith("\n") else value
        run.vars[r.capture] = value
        run.note(f"{what} {argv[0]} into {r.capture}")
        return True, value
    if filtering:
        h, b = "h" in flags, "b" in flags
        body = run.body_offset()
        if h and not b:
            run.mail = out + run.mail[body:]
        elif b and not h:
            run.mail = run.mail[:body] + out
        else:
            run.mail = out
        run.note(f"{what} {argv[0]} (exit {code})")
    else:
        run.set_lastfolder(r.action.strip())
        run.note(f"{what} {argv[0]} (exit {code})")
    return True, None
