"""`python -m bench ...` (from the repository root): see `bench.cli`."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
