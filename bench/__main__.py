"""`python -m bench ...` (from the repository root): see `bench.cli`."""

import sys

from bench.cli import main

sys.exit(main())
