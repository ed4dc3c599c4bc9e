"""``python -m monomail.sendmail``: the same as ``monomail sendmail``."""

import sys

from . import main

sys.exit(main())
