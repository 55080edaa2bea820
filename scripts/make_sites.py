"""Write the simulated 3-site DICOM pool: `python scripts/make_sites.py [--out data/sites] [--seed 0] [--limit N]`."""

import argparse
import sys

from medtriage.data.sources.dicom_sites import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
