"""The `medtriage` command: each module of COMMAND_MODULES registers its subcommands, imported one by one.

The other entry points of this package (train, export, make_tiles, ...) are console scripts of their own.

Torch-free: a hospital install (no extras) must be able to run every inference subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

from medtriage import __version__
from medtriage.errors import MedTriageError, printable

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
    return report_errors(args.func, args)


def report_errors(func: Callable[..., int | None], *args) -> int:
    """Run one command: a MedTriageError ends it with its message on stderr and exit status 2, not a traceback."""
    try:
        return int(func(*args) or 0)
    except MedTriageError as err:
        print(f"error: {printable(str(err))}", file=sys.stderr)
        return 2


def exit_with_message(err: MedTriageError) -> NoReturn:
    """In a Hydra entry point: end a single run with the message and exit status 2 (Hydra would print a traceback).

    In a multirun the error is raised again, so that the sweeper records the failed job as before."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    print(f"error: {printable(str(err))}", file=sys.stderr)
    raise SystemExit(2) from None
