import sys

from mmerase.cli import main

sys.exit(main())
