"""``python -m xloss.bench``: the benchmark's command line, and the entry the worker processes run as."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
