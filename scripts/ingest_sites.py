"""De-identify every site folder into the pool: `python scripts/ingest_sites.py [--sites data/sites] [--into data/pool/ingested]`."""

import sys

from medtriage.cli.ingest_sites import main

if __name__ == "__main__":
    sys.exit(main())
