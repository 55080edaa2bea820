"""The `medtriage` command: each module of COMMAND_MODULES registers its subcommands, imported one by one.

The other entry points of this package (train, export, make_tiles, ...) are console scripts of their own.

Torch-free: a hospital install (no extras) must be able to run every inference subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from medtriage import __version__
from medtriage.errors import ConfigError, MedTriageError, printable
from medtriage.signals import INTERRUPTED_STATUS

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
    """Run one command: a MedTriageError ends it with its message on stderr and exit status 2, not a traceback; Ctrl-C
    ends it with a line saying so and the status of a process SIGINT ended (130).

    A reader of its output that stops early (`| head -1`) does not stop the command: what it writes after its output
    (an audit's --json, a figure) is still written, and it ends with its own status."""
    with readers_may_leave():
        try:
            return int(func(*args) or 0)
        except MedTriageError as err:
            print(f"error: {printable(str(err))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)  # the user's choice, not an error
            return INTERRUPTED_STATUS


INTERRUPTED = "stopped (Ctrl-C or a signal); a file or folder it was still writing may be incomplete: run the command again"


def write_output(path: str | os.PathLike, data: bytes | Callable, what: str) -> None:
    """`write_atomic` of a file the command line named (`what`: its option, or what the file is): one that cannot be
    written (a folder that is not there to be made, or not writable) ends the command with one line saying so."""
    from medtriage.io.safe_output import write_atomic

    try:
        write_atomic(path, data)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(
            f"cannot be written ({reason})", where=f"{what} {path}", hint="give a file in a folder you can write to"
        ) from None


@contextmanager
def readers_may_leave() -> Iterator[None]:
    """stdout and stderr, for the block, as `ReaderMayLeave` streams."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ReaderMayLeave(sys.stdout), ReaderMayLeave(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


class ReaderMayLeave:
    """A standard stream whose reader may go away (a pipe into `head`, a closed log viewer): from then on what is
    written to it goes to /dev/null, where a BrokenPipeError would end the command halfway with a traceback. The
    stream itself is pointed there too, so that Python's flush at exit cannot fail again."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._point_at_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._point_at_devnull()

    def _point_at_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        except (OSError, ValueError):  # a stream with no file behind it (a test's capture): its writes stay dropped
            pass
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)  # isatty, fileno, encoding, buffer...


def exit_with_message(err: MedTriageError) -> NoReturn:
    """In a Hydra entry point: end a single run with the message and exit status 2 (Hydra would print a traceback).

    In a multirun the error is raised again, so that the sweeper records the failed job as before."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    print(f"error: {printable(str(err))}", file=sys.stderr)
    raise SystemExit(2) from None


def exit_interrupted() -> NoReturn:
    """In a Hydra entry point: end on Ctrl-C (or SIGTERM/SIGHUP, raised as it in a run: medtriage.signals) as
    `report_errors` does, with one line and status 130, not Hydra's traceback. The run has said already whether and how
    a resume continues it."""
    print("stopped (Ctrl-C or a signal)", file=sys.stderr)
    raise SystemExit(INTERRUPTED_STATUS) from None
