"""The interpreter: walk a parsed rcfile for one message, procmail's way, and say what it came to.

Job: `run`, the package's entry point, and the `Interpreter` behind it: statements in
order (assignments, with the special meaning of MAILDIR, LOGFILE, LOG, INCLUDERC and
SWITCHRC; recipes), each recipe's flags and conditions (procmailrc(5) RECIPES and
FLAGS: ``A`` ``a`` ``E`` ``e`` against the previous recipe's conditions and success;
``H`` ``B`` ``D``; ``!``, ``$``, ``?``, ``< N``/``> N``, ``VAR ??``, regular
expressions through ``egrep``), nested blocks and ``c`` clones (difference 11 in the
package docstring), INCLUDERC/SWITCHRC files read and parsed when reached, and the
fall-through to DEFAULT. A delivering recipe that succeeds ends the run unless
``c``; one that fails is logged and the next statement runs. Work per message is
bounded (`MAX_STEPS` statements, `MAX_CLONES` clones, `MAX_RCFILES` nested
rcfiles): past a bound the rest is skipped and DEFAULT gets the message. `run` never
raises: an internal error abandons the recipes and the caller delivers.

Not here: the syntax (``parser``), the regex dialect (``egrep``), ``$`` expansion
(``expand``), the run's state and log (``state``), what an action does (``actions``),
the effects (the caller's `Executor`).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError
from . import actions, egrep
from .executor import Executor, read_rcfile
from .message import skip_from
from .parser import parse
from .state import Frame, RunState
from .syntax import SCORE, SIZE, VARTEST, Assignment, Rcfile, Recipe

MAX_STEPS = 20_000  # statements executed per message, clones included
MAX_CLONES = 16
MAX_RCFILES = 16  # INCLUDERC nesting


@dataclass(frozen=True)
class Result:
    """What `run` came to.

    ``delivered``: a delivering recipe completed, or DEFAULT was written; if False the
    caller delivers ``message`` to the user's mailbox itself. ``message``: the message
    after any filters (no From_ line). ``actions``: one line per thing done or failed,
    in order; ``errors``: the failures and refusals among them.
    """

    delivered: bool
    message: bytes
    actions: tuple[str, ...]
    errors: tuple[str, ...] = ()


def run(
    rc: Rcfile,
    message: bytes,
    env: dict[str, str],
    executor: Executor,
    *,
    read_file: Callable[[Path], str] | None = None,
    allow_pipes: bool = False,
    sender: str = "",
    when: float | None = None,
    deliver_default: bool = True,
) -> Result:
    """Run ``rc`` on ``message`` (LF endings, no From_ line) for the user described by
    ``env`` (HOME, LOGNAME, MAILDIR, DEFAULT, SENDER, ...).

    ``read_file`` reads INCLUDERC/SWITCHRC files (default `read_rcfile`: regular files
    up to MAX_RCFILE bytes, anywhere the process may read; pass a confined reader to
    limit where); ``allow_pipes`` lets the rcfile run programs through the executor;
    ``sender`` and ``when`` make the From_ line the recipes see
    (default: env SENDER, now). Never raises for anything the rcfile or the executor
    does; see `Result`.
    """
    engine = Interpreter(rc, message, env, executor, read_file or read_rcfile, allow_pipes,
                         sender, time.time() if when is None else when, deliver_default)
    try:
        engine.finish()
        engine.abstract()
    except Exception as exc:  # noqa: BLE001 - a bug here must not lose the message
        engine.error(f"internal error, recipes abandoned: {type(exc).__name__}: {exc}")
        return Result(False, message, tuple(engine.shared.actions), tuple(engine.shared.errors))
    return Result(engine.delivered, skip_from(engine.mail), tuple(engine.shared.actions),
                  tuple(engine.shared.errors))


class Interpreter(RunState):
    """One pass over the rcfile for one message (a clone is another `Interpreter`)."""

    def clone(self) -> Interpreter:
        other = copy.copy(self)
        other.vars = dict(self.vars)
        other.frames = [Frame(f.items, f.pos, f.kind, f.name, f.ifdepth) for f in self.frames]
        other.ifstack = list(self.ifstack)
        other.tag = self.tag + "clone: "
        return other

    # ------------------------------------------------------------ statements

    def finish(self) -> None:
        self.execute()
        if not self.delivered and self.deliver_default:
            default = self.vars.get("DEFAULT", "")
            if not default:
                self.error("DEFAULT is not set: not delivered")
            elif actions.store(self, default, self.mail, True, lock=True, what="default"):
                self.delivered = True

    def execute(self) -> None:
        while self.frames and not self.delivered:
            frame = self.frames[-1]
            if frame.pos >= len(frame.items):
                self.frames.pop()
                if frame.kind == "block" and self.ifstack:
                    self.prevcond, self.lastcond = self.ifstack.pop()
                elif frame.kind == "file":
                    del self.ifstack[frame.ifdepth:]
                continue
            item = frame.items[frame.pos]
            frame.pos += 1
            self.shared.steps += 1
            if self.shared.steps > MAX_STEPS:
                self.error(f"more than {MAX_STEPS} steps: the rest of the rcfile is skipped")
                self.frames.clear()
                return
            if isinstance(item, Assignment):
                self.assign(item)
            else:
                self.recipe(item)

    def assign(self, a: Assignment) -> None:
        if a.value is None:
            self.vars.pop(a.name, None)
            self.special(a.name, None)
            return
        value = self.expand_one(a.value)
        self.vars[a.name] = value
        self.special(a.name, value)

    def special(self, name: str, value: str | None) -> None:
        if name == "MAILDIR" and value is not None:
            target = self.path(value)
            if value and os.path.isdir(target):
                self.cwd = str(target)
            else:
                self.error(f"couldn't chdir to {value!r}")
        elif name == "LOGFILE":
            self.set_logfile(value or "")
        elif name == "LOG" and value:
            self.executor_log(self.tag + "LOG: " + value.rstrip("\n"))
            self.logwrite(value)
        elif name == "INCLUDERC" and value:
            self.include(value)
        elif name == "SWITCHRC":
            self.switch(value or "")

    def load(self, value: str, what: str) -> Rcfile | None:
        path = self.path(value)
        try:
            text = self.read_file(path)
        except Exception as exc:  # noqa: BLE001 - the reader is the caller's
            self.error(f"couldn't read {what} {value}: {type(exc).__name__}: {exc}")
            return None
        try:
            return parse(text, str(path))
        except RecipeError as exc:
            self.error(f"{what} {value} skipped: {exc}")
            return None

    def include(self, value: str) -> None:
        if value == "/dev/null":
            return
        if sum(f.kind == "file" for f in self.frames) >= MAX_RCFILES:
            self.error(f"INCLUDERC {value} skipped: nested more than {MAX_RCFILES} deep")
            return
        rc = self.load(value, "INCLUDERC")
        if rc is not None and rc.statements:
            self.frames.append(Frame(rc.statements, 0, "file", rc.name, len(self.ifstack)))

    def switch(self, value: str) -> None:
        idx = max(k for k, f in enumerate(self.frames) if f.kind == "file")
        ifdepth = self.frames[idx].ifdepth
        if value and value != "/dev/null":
            rc = self.load(value, "SWITCHRC")
            if rc is None:
                return  # as procmail: carry on with the current rcfile
            del self.ifstack[ifdepth:]
            self.frames[idx:] = [Frame(rc.statements, 0, "file", rc.name, ifdepth)]
            return
        del self.ifstack[ifdepth:]
        del self.frames[idx:]

    # ------------------------------------------------------------ recipes

    def recipe(self, r: Recipe) -> None:
        flags = r.flags
        if "e" in flags and flags & {"E", "a"}:
            flags = flags - {"E", "a"}
            self.note(f"line {r.line}: 'e' overrides 'E' and 'a'")
        matched = self.conditions(r, flags)
        if not flags & {"A", "a"}:
            self.lastcond = matched
        if not self.prevcond or "E" not in flags:
            self.prevcond = matched
        if not matched:
            return
        if r.kind == "block":
            self.block(r, flags)
            return
        if r.kind == "folder":
            ok = actions.folder(self, r, flags)
        elif r.kind == "forward":
            ok = actions.forward(self, r, flags)
        else:
            ok, captured = actions.program(self, r, flags)
            if captured is not None:
                self.special(r.capture, captured)
        delivering = r.kind != "pipe" or not (r.capture or "f" in flags)
        if ok and delivering:
            if "c" not in flags:
                self.delivered = True
            elif self.vars.get("LOGABSTRACT", "").lower().startswith("a"):
                self.abstract(force=True)
        self.lastsucc = ok

    def conditions(self, r: Recipe, flags: frozenset[str]) -> bool:
        ok = True
        if "e" in flags:
            ok = self.prevcond and not self.lastsucc
        if "E" in flags:
            ok = ok and not self.prevcond
        if "a" in flags:
            ok = ok and self.lastcond and self.lastsucc
        if "A" in flags:
            ok = ok and self.lastcond
        for cond in r.conditions:
            if not ok:
                break
            try:
                ok = self.test(cond.text, flags)
            except ValueError as exc:
                self.error(f"line {cond.line}: condition skipped as false: {exc}")
                ok = False
        return ok

    def test(self, text: str, flags: frozenset[str]) -> bool:
        negate = False
        kind = "HB" if {"H", "B"} <= flags else "B" if "B" in flags else "H"
        var: bytes | None = None
        while True:
            c = text[:1]
            if c == "$":
                text = self.expand_cond(text[1:]).lstrip(" \t")
                continue
            if c == "!":
                negate = not negate
                text = text[1:].lstrip(" \t")
                continue
            area = var
            if c == "?":
                data = area if area is not None else self.area(kind)
                code = self.run_test(text[1:], data)
                return code is not None and (code == 0) != negate
            if c in ("<", ">"):
                expanded = self.expand_cond(text, dq=False)
                m = SIZE.match(expanded)
                pivot = int(m.group(1)) if m else 0
                size = len(area) if area is not None else len(self.mail)
                return (size < pivot if expanded[0] == "<" else size > pivot) != negate
            if SCORE.match(text):
                raise ValueError("weighted scoring conditions (w^x) are not supported")
            m = VARTEST.match(text)
            if m:
                name = m.group(1)
                if name in ("H", "B", "HB", "BH"):
                    var = self.area("HB" if name == "BH" else name)
                else:
                    var = self.vars.get(name, "").encode("utf-8", "surrogateescape")
                text = text[m.end():].lstrip(" \t")
                continue
            if c == "\\":
                text = text[1:]
            if not text:
                return not negate
            rx = egrep.compile_pattern(text, "D" not in flags)
            return self.search(rx, area if area is not None else self.area(kind)) != negate

    def search(self, rx: egrep.Regex, area: bytes) -> bool:
        found, match = egrep.search(rx, area)
        if match is not None:
            self.vars["MATCH"] = match
        return found

    def block(self, r: Recipe, flags: frozenset[str]) -> None:
        self.ifstack.append((self.prevcond, self.lastcond))
        if "c" not in flags:
            self.frames.append(Frame(r.block, 0, "block", "", len(self.ifstack)))
            self.lastsucc = True
            return
        if self.shared.clones >= MAX_CLONES:
            self.ifstack.pop()
            self.error(f"line {r.line}: more than {MAX_CLONES} clones: block skipped")
            self.lastsucc = False
            return
        self.shared.clones += 1
        child = self.clone()
        child.lastsucc = True
        child.frames.append(Frame(r.block, 0, "block", "", len(child.ifstack)))
        child.note(f"line {r.line}: running the block and the rest of the rcfile on a copy")
        child.finish()
        child.abstract()
        self.ifstack.pop()
        wait = bool(flags & {"w", "W"}) or r.lock
        self.lastsucc = child.delivered if wait else True
