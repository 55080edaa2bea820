"""Build the pooled manifest from de-identified site folders: `python scripts/build_pool.py [--sites data/pool/ingested] [--pool data/pool/pneumonia_sites]`."""

import sys

from medtriage.cli.data import build_pool_main as main

if __name__ == "__main__":
    sys.exit(main())
