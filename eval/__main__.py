"""``python -m eval ...``: the evaluation command line (same as ``mmerase eval ...``)."""

import sys

from eval.cli import main

sys.exit(main())
