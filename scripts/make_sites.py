"""Write the simulated 3-site DICOM pool: `python scripts/make_sites.py [--out data/sites] [--seed 0] [--limit N]`."""

import sys

from medtriage.cli.data import make_sites_main as main

if __name__ == "__main__":
    sys.exit(main())
