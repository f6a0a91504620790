"""``python -m mmerase.eval ...``: the evaluation command line (the same as ``mmerase eval ...``)."""

import sys

from .cli import main

sys.exit(main())
