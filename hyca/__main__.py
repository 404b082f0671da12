"""``python -m hyca``: the command line (see :mod:`hyca.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
