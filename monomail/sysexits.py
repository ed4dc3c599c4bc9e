"""Exit codes and one-line failures for the commands other programs call.

Job: the sysexits(3) codes that ``monomail sendmail`` and ``monomail deliver`` answer
with (so cron, PHP, Postfix and Exim know whether to retry), and the two helpers both
commands share: print one line, never a traceback; send log lines to stderr only with
``-v``. The exception that carries a code is ``errors.Failure`` (the one exception tree).
An error nobody classified exits ``EX_TEMPFAIL`` (DESIGN invariant 2).
"""

from __future__ import annotations

import logging
import sys

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


def fail(prog: str, code: int, message: str) -> int:
    """Print ``prog: message`` on one line to stderr; return ``code``."""
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr)
    return code


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
