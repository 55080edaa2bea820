"""De-identify every site folder into the pool, each with its own site key:
`python scripts/ingest_sites.py [--sites data/sites] [--into data/pool/ingested] [--create-keys] [--workers N]`."""

import argparse
import sys

from medtriage.errors import MedTriageError
from medtriage.io.ingest import add_sites_arguments, run_sites

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_sites_arguments(parser)
    try:
        sys.exit(run_sites(parser.parse_args()))
    except MedTriageError as err:
        sys.exit(f"error: {err}")
