"""The `medtriage` command: each module of COMMAND_MODULES registers its subcommands, imported one by one.

The other entry points of this package (train, export, make_tiles, ...) are console scripts of their own.

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
    "medtriage.cli.data",  # make-sites, build-pool, audit
    "medtriage.io.ingest",
    "medtriage.serve.cli",
    "medtriage.serve.node.cli",
    "medtriage.delivery.cli",
    "medtriage.export.quantize",
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
