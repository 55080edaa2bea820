"""Build a pathology tile pool or the synthetic sites figure: `python scripts/make_tiles.py --help`."""

import sys

from medtriage.cli.make_tiles import main

if __name__ == "__main__":
    sys.exit(main())
