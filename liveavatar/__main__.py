"""`python -m liveavatar ...` entry point."""

import sys

from liveavatar.cli import main

if __name__ == "__main__":
    sys.exit(main())
