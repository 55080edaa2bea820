"""De-identify every site folder into the pool, each with its own site key:
`python scripts/ingest_sites.py [--sites data/sites] [--into data/pool/ingested] [--create-keys] [--workers N]`."""

from __future__ import annotations

import argparse
import sys

from medtriage.cli import report_errors
from medtriage.io.ingest import add_sites_arguments, run_sites


def main(argv: list[str] | None = None) -> int:
    return report_errors(run_sites, build_parser().parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_sites_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main())
