"""Build the pooled manifest from site folders: `python scripts/build_pool.py [--sites data/sites] [--pool data/pool/pneumonia_sites]`."""

import argparse
import sys

from medtriage.data.pool import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
