"""``python -m anycam`` and the ``anycam`` console script: the command line of ``anycam.cli``."""

from __future__ import annotations

import sys

from .cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
