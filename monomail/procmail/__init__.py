"""Procmail-compatible recipe files: parse a user's ``.procmailrc`` and run it on one message.

Job: the decisions procmail(1) makes for one local delivery, with procmail's syntax
(procmailrc(5), procmailex(5)) and, as far as a program without a shell can, its
results. `parse` turns rcfile text into a frozen `Rcfile`; `run` walks it for one
message. The engine decides; an `Executor` supplied by the caller performs every
effect: appending to an mbox, writing a Maildir file, queueing a forward, running a
program, logging. Everything is blocking; the caller runs `run` in a worker thread.
Not here: where a user's rcfile lives and whether they may have one, the mailbox
writers, the MTA queue, the program sandbox (all the caller's).

The package, module by module, each importing only those on the rows below it (no
cycles; no module imports another's private names)::

    __init__  the public API below       -> engine, parser, executor, syntax, ..errors
    engine    run: statements, flags and conditions, blocks, clones, INCLUDERC, DEFAULT
                                         -> actions, state, parser, egrep, executor,
                                            message, syntax, ..errors
    actions   what a matched recipe does: folder, forward, program, filter, capture
                                         -> state, message, syntax
    state     one run's variables, message views, log and LOGFILE, program start
                                         -> expand, executor, message, syntax
    parser    rcfile text -> Rcfile, or RecipeError      -> egrep, syntax, ..errors
    expand    sh-like quoting, $VAR, ${VAR:-x}, backquotes (via expand.Context)
                                         -> syntax
    egrep     procmail's egrep dialect -> Python re; search and MATCH
    executor  the Executor protocol the caller implements; confine, read_rcfile
    message   layout (header/body, continued fields), skip_from, terminate
    syntax    the parsed form (frozen dataclasses), condition shapes, quoting states

The last four import nothing of ours. The rest of monomail imports this package (the
names in ``__all__``), not its modules.

Supported: recipes ``:0 [flags] [: [lockfile]]`` with the flags H B D A a E e h b f c
w W i r; conditions (``*``) with procmail's egrep dialect, ``^TO_`` ``^TO``
``^FROM_DAEMON`` ``^FROM_MAILER``, ``\\<`` ``\\>``, ``^^``, ``\\/`` (MATCH), ``!``,
``$`` (expanded first), ``< N`` / ``> N``, ``VAR ?? regex`` (and ``H`` ``B`` ``HB``
``??``), ``?`` program exit codes; actions: an mbox file, a Maildir folder (``name/``),
``/dev/null``, ``! addresses``, ``| program``, ``VAR=| program``, ``f`` filters, nested
``{ }`` blocks (``c`` on a block runs a clone); variable assignments with sh-like
quoting and ``$VAR ${VAR} ${VAR:-x} ${VAR:+x} ${VAR-x} ${VAR+x} $\\VAR $_ $- $$``,
backquotes; MAILDIR, DEFAULT, LOGFILE, LOG, INCLUDERC, SWITCHRC, HOME, LOGNAME, SENDER,
LASTFOLDER, MATCH. Old-style ``:N`` recipes (N condition lines without ``*``) too.

Semantics worth knowing (as procmail):

- The message is seen with a ``From <sender>  <ctime>`` line in front (procmail's
  ``-f sender``); header conditions see it, size conditions count it, pipes and
  filters receive it; mbox and Maildir writes and forwards leave it off. Header
  conditions see continued header lines joined with a space. ``^`` and ``$`` match a
  newline (the searched area is treated as if it had one before and after it), so
  ``.`` and ``[^...]`` never cross lines; matching ignores case unless ``D``.
- Folders are created on demand, but only their last component: the directory a
  folder lives in must exist (``lists/devel/`` fails while ``lists/`` does not
  exist). Relative names are relative to MAILDIR.
- A delivering recipe that succeeds ends processing unless ``c``. One that fails (the
  executor raised, the program exited non-zero under ``w``, pipes are disabled...) is
  logged and processing simply continues, so the message falls through to later
  recipes and finally to DEFAULT. Without ``w`` a program's exit code is ignored.
- When processing falls off the end, the engine delivers to DEFAULT itself (mbox with
  the lock, or Maildir when DEFAULT ends in ``/``), so ``Result.delivered`` is True
  unless that failed too; then (or with ``deliver_default=False``) the caller
  delivers ``Result.message`` itself. The message is never dropped silently: only a
  recipe the user wrote (``/dev/null``, a program without ``w``) can discard it.

Security stance: recipe paths are the user's own choice, but every write goes
through the `Executor`, which confines it (`confine` helps: resolve symlinks, raise
`PermissionError` outside the user's tree); the engine turns any exception from the
executor into a failed delivery and never crashes. Programs are never run through a
shell (DESIGN invariant 4) and only when the caller allows them; with
``allow_pipes`` the user runs programs of their choice with the executor's identity,
so the executor must sandbox them (user id, timeout, resource limits). INCLUDERC
files are read with ``read_file`` (regular files only, size-capped); error messages
never quote their text. LOGFILE is written by the engine itself, append-only, and
only inside the HOME given in ``env`` (not the one the rcfile may assign). Work per
message is bounded (steps, clones, include depth); a runaway rcfile stops as if it
had ended, and DEFAULT gets the message.

Differences from procmail (intentional, found by running real procmail 3.23pre on
``tests/procmail_corpus``):

1. No shell. A program line is split into words by procmail's own quoting and
   ``$`` expansion rules and executed directly; a line that needs a shell (an
   unquoted ``&`` ``|`` ``;`` ``<`` ``>`` ``(`` ``)``) is refused and the recipe fails.
   Globs are passed literally; a leading ``~/`` becomes ``$HOME/``. SHELL,
   SHELLMETAS and SHELLFLAGS have no effect. Programs run in the current MAILDIR
   (``PWD`` in their environment).
2. Programs (``|``, ``f``, ``?``, ``VAR=|``, backquotes) run only with
   ``allow_pipes``; otherwise a ``|`` recipe fails (falls through), a filter leaves
   the message unchanged, a ``?`` condition is false and a backquote expands to
   nothing, each logged.
3. A program that cannot be started (or times out, or the executor raises) is a
   failed delivery even without ``w``; procmail counts it as delivered.
4. ``!`` hands the addresses and the message to the MTA's queue (`Executor.forward`);
   SENDMAIL and SENDMAILFLAGS are not run.
5. mbox From_ lines are monomail's (envelope sender, arrival time), written by the
   executor on every mbox delivery: also after a filter removed or rewrote the From_
   line, and for a body-only (``b``) delivery, where procmail writes no From_ line.
6. mbox quoting is monomail's mboxrd (``>*From `` gets one more ``>``), procmail's is
   mboxo (only ``From `` is quoted); ``r`` does not turn quoting or the separating
   empty line off for mbox. A ``Content-Length:`` field is never rewritten (procmail
   rewrites it unless ``-Y``).
7. Folders are mbox files and Maildirs (``name/``). MH folders (``name/.``) and
   plain directories (an existing directory named without ``/``) fail. More
   Maildir folders after a Maildir folder each get a copy (procmail hardlinks);
   other extra names are skipped (procmail makes them directory folders).
8. Locking is the executor's: ``:`` asks it to lock the mbox; a named local
   lockfile is not created; LOCKFILE, LOCKEXT, LOCKSLEEP, LOCKTIMEOUT do nothing.
   As in procmail, a lock on a program recipe implies ``W``.
9. Stricter parsing: weighted scoring conditions (``* 2^1 regex``), unknown flag
   letters, text after the lockfile name, an unexpected ``}``, a missing ``}``, an
   unterminated quote, a recipe without an action, ``VAR=! ...`` and an invalid
   regular expression raise `RecipeError`; procmail warns and carries on. An
   INCLUDERC or SWITCHRC file with such an error is skipped whole (logged).
10. Regular expressions run on Python's ``re`` after translation. ``\\/`` must be
    outside parentheses; MATCH takes the left part as short as possible and the
    right part as long as possible, which is procmail's result for the usual
    idioms. ``^^`` anchors at the end when only ``)`` follow it, else at the start.
    A pathological pattern (nested repetition) can backtrack for long; procmail's
    matcher is linear.
11. ``c`` on a block: procmail forks a clone that runs concurrently; here the clone
    runs the block and the rest of the rcfile (and DEFAULT) to completion first,
    then the parent continues after the block. At most 16 clones per message.
12. ``i`` does not turn a failed mbox or Maildir write into a success (procmail
    does); it only forgives a program that closes its input early.
13. Not implemented (plain variables here): HOST, DELIVERED, EXITCODE, TRAP, UMASK,
    LINEBUF, SHIFT, DROPPRIVS, COMSAT, VERBOSE, TIMEOUT (the executor's business),
    ORGMAIL (when DEFAULT fails, the caller delivers). ``$#`` and ``$=`` are 0,
    positional ``$1``... are empty, ``$$`` is monomail's pid.
14. LOGFILE must resolve inside HOME or it is ignored (logged). It receives LOG
    text, monomail's error lines and procmail's end-of-delivery abstract (From_,
    Subject, Folder lines, or for every delivery with LOGABSTRACT=all); no VERBOSE
    output.
"""

from __future__ import annotations

from ..errors import RecipeError
from .engine import MAX_CLONES, MAX_RCFILES, MAX_STEPS, Result, run
from .executor import MAX_RCFILE, Executor, confine, read_rcfile
from .parser import parse
from .syntax import Assignment, Condition, Rcfile, Recipe, Statement

__all__ = [
    "MAX_CLONES", "MAX_RCFILE", "MAX_RCFILES", "MAX_STEPS",
    "Assignment", "Condition", "Executor", "Rcfile", "Recipe", "RecipeError", "Result", "Statement",
    "confine", "parse", "read_rcfile", "run",
]
