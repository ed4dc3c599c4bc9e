"""Exit codes and one-line failures for the commands other programs call.

Job: the sysexits(3) codes that ``monomail sendmail`` and ``monomail deliver`` answer
with (so cron, PHP, Postfix and Exim know whether to retry), and the helpers both
commands share: `run` turns whatever the command raises into its exit code and one line
on stderr, never a traceback (`fail`); log lines go to stderr only with ``-v``. The
exception that carries a code is ``errors.Failure`` (the one exception tree). An error
nobody classified exits ``EX_TEMPFAIL`` (DESIGN invariant 2).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import ConfigError, Failure, UsageError

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_OSERR = 71
EX_TEMPFAIL = 75
EX_CONFIG = 78


def fail(prog: str, code: int, message: str) -> int:
    """Print ``prog: message`` on one line to stderr; return ``code``."""
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr)
    return code


def run(prog: str, command: Callable[[], int], *, usage: int = EX_USAGE, config: int = EX_CONFIG) -> int:
    """``command()``'s exit code; whatever it raises becomes a code and one line on stderr:
    `UsageError` ``usage``, `ConfigError` ``config``, `Failure` its own code, and an
    interrupt or an error nobody classified ``EX_TEMPFAIL`` (the caller keeps the message)."""
    try:
        return command()
    except UsageError as exc:
        return fail(prog, usage, str(exc))
    except ConfigError as exc:
        return fail(prog, config, f"config error: {exc}")
    except Failure as exc:
        return fail(prog, exc.code, exc.message)
    except KeyboardInterrupt:
        return fail(prog, EX_TEMPFAIL, "interrupted")
    except Exception as exc:  # nobody classified it: temporary, and never a traceback
        return fail(prog, EX_TEMPFAIL, f"internal error, try again later: {type(exc).__name__}: {exc}")


def setup_logging(prog: str, verbose: bool) -> None:
    root = logging.getLogger()
    handler: logging.Handler
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
        root.setLevel(logging.INFO)
    else:
        handler = logging.NullHandler()
    root.handlers[:] = [handler]
