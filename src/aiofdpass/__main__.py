"""``python -m aiofdpass``: the command-line tool (``aiofdpass --help``)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
