"""The `medtriage` command. Each subcommand lives next to the code it drives and registers itself.

Torch-free: a hospital install (no extras) must be able to run every inference subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medtriage import __version__
from medtriage.errors import MedTriageError

# Modules that define `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = [
    "medtriage.data.sources.dicom_sites",
    "medtriage.io.ingest",
    "medtriage.data.audit",
    "medtriage.serve.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtriage", description="Imaging triage: build site pools, score studies, serve models.")
    parser.add_argument("--version", action="version", version=f"medtriage {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("medtriage"):
                continue  # command not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MedTriageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
