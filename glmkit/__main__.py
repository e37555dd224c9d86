"""`python -m glmkit` and the `glmkit` console script."""

import sys

from glmkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
