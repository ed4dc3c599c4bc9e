"""``python -m monomail.reader``: the same as ``monomail mail``."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
