"""The `medtriage` command: each module of COMMAND_MODULES registers its subcommands, imported one by one.

The other entry points of this package (train, export, make_tiles, ...) are console scripts of their own.

Torch-free: a hospital install (no extras) must be able to run every inference subcommand.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

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


HYDRA_RAISES_ENV = "MEDTRIAGE_HYDRA_RAISES"  # set with HYDRA_FULL_ERROR by `hydra_command`, not by the user


def hydra_command(app: Callable[[], Any]) -> Callable[[], Any]:
    """A @hydra.main entry point whose failures outside its job end as the other commands' do: one line, status 2.

    Hydra reports them itself, with status 1: a misspelt key, group option or value type over several lines (for a
    misspelt key, advising the `+key=value` that adds a setting nothing reads), a run folder that cannot be made as a
    traceback, and so is a MedTriageError of a multirun job, which the sweeper raises again. For these Hydra is made to
    raise (HYDRA_FULL_ERROR), and they are answered here; an exception of the job itself (a bug) keeps its traceback.
    HYDRA_FULL_ERROR=1 set by the user keeps Hydra's own report."""
    task = app.__wrapped__  # the job's function: an error raised through it is the job's (hydra.main wraps it)

    @functools.wraps(app)
    def command() -> Any:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(HYDRA_RAISES_ENV) != "1":
            return app()
        saved = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", HYDRA_RAISES_ENV)}
        os.environ.update({"HYDRA_FULL_ERROR": "1", HYDRA_RAISES_ENV: "1"})  # the folds of a cross-validation too
        try:
            return app()
        except Exception as err:
            found = hydra_failure(err, task)
            if found is None:
                raise
            print(f"error: {printable(str(found))}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return command


def hydra_failure(err: Exception, task: Callable) -> MedTriageError | None:
    """`err` as a one-line MedTriageError when Hydra, not the job `task`, failed: it could not compose the config or
    make the run's folder. None for an exception the job raised (other than a MedTriageError), or our own code did."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, MedTriageError):
        return err
    codes = _codes(err)
    if task.__code__ in codes:
        return None  # the job's own exception (a bug): its traceback says where
    if isinstance(err, HydraException | OmegaConfBaseException):
        return _composition_error(err)
    if isinstance(err, OSError) and not any(_ours(code) for code in codes):  # Hydra makes the run's folder
        return ConfigError(
            f"cannot make or write the run's folder ({err.strerror or type(err).__name__})",
            where=err.filename,
            hint="set paths.runs_dir (or hydra.run.dir, hydra.sweep.dir with -m) to a folder you can write to",
        )
    return None


def _codes(err: BaseException) -> list:
    """The code of each frame `err` was raised through."""
    codes, frame = [], err.__traceback__
    while frame is not None:
        codes.append(frame.tb_frame.f_code)
        frame = frame.tb_next
    return codes


def _ours(code) -> bool:
    """Whether `code` is MedTriage's (a multirun callback's, say), other than `hydra_command`'s, which catches."""
    return code.co_filename.startswith(os.path.dirname(os.path.dirname(__file__))) and code.co_filename != __file__


def _composition_error(err: Exception) -> ConfigError:
    """A config Hydra could not compose, as one line naming the override and what it may be instead."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    first = str(cause).splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, option = err.missing_cfg_file.rsplit("/", 1)
        options = f": {', '.join(err.options)}" if err.options else ""
        return ConfigError(f"no {group} option {option!r}", where=f"{group}={option}", hint=f"choose one of configs/{group}/{options}")
    if isinstance(err, OverrideParseException):
        return ConfigError(
            f"cannot read the override: {first}",
            where=err.override,
            hint="write it as key=value, quoting a value with spaces, commas or brackets",
        )
    key = getattr(cause, "full_key", None) or None
    if isinstance(cause, ConfigAttributeError | ConfigKeyError):
        return ConfigError(
            f"no such setting ({first})",
            where=key,
            hint="check its spelling against the fields of src/medtriage/config/schema.py; a + prefix would add a key that nothing reads",
        )
    if isinstance(cause, OmegaConfBaseException) and key:
        return ConfigError(first, where=key, hint="give a value of the setting's type")
    return ConfigError(
        "; ".join(line.strip() for line in str(err).splitlines() if line.strip()), hint="fix the override on the command line"
    )
