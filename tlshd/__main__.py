"""`python -m tlshd`: the same as the `tlshd` command."""

import sys

from tlshd.cli import main

if __name__ == "__main__":
    sys.exit(main())
