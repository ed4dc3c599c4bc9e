"""``monomail.submit``: the old home of ``monomail sendmail``, now the ``sendmail`` package.

Kept only because ``cli`` dispatches ``monomail sendmail`` to this module name; it can go
once ``cli`` names ``.sendmail`` instead.
"""

from __future__ import annotations

import sys

from .sendmail import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
