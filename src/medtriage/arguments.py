"""Argument types the command lines share: a bad value is refused by argparse with what was expected."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from medtriage.errors import ConfigError


def positive_int(text: str) -> int:
    return _whole(text, 1, None, "a whole number of at least 1")


def non_negative_int(text: str) -> int:
    return _whole(text, 0, None, "a whole number of at least 0")


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """The argument type of a whole number from `low` to `high`."""
    return lambda text: _whole(text, low, high, f"a whole number from {low} to {high}")


def _whole(text: str, low: int, high: int | None, expected: str) -> int:
    """Digits only: no sign, no spaces, no "1e3". `str.isdigit` alone also takes superscripts ("²"), which `int`
    refuses, and argparse would then answer with its own message naming no range."""
    try:
        value = int(text) if text.isdigit() else None
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A share of something, in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 up to (not including) 1, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def path(text: str) -> Path:
    """A file or folder argument: an empty one ("" from an unset shell variable, `--pool "$POOL"`) would mean the
    folder the command runs in, and a pool or site folders would be written there."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one (it would mean the current folder)")
    return Path(text)


def path_as_typed(text: str) -> str:
    """`path`'s refusal of an empty path, keeping the text as typed: a results table names each input as given
    (`Path` would turn "./scans/" into "scans"), and TLS and token files go on as the strings their readers take."""
    path(text)
    return text


def refuse_file_as_folder(path: str | Path | None, option: str) -> None:
    """An output folder option naming an existing file fails before any work, not after it with a traceback."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(
            "this is a file, not a folder", where=f"{option} {path}", hint="give a folder to write into (it is created if missing)"
        )


def refuse_folder_as_file(path: str | Path | None, option: str, example: str) -> None:
    """An output file option naming a folder fails before any work, not after it with a traceback."""
    if path is not None and Path(path).is_dir():
        raise ConfigError("this is a folder, not a file", where=f"{option} {path}", hint=f"give a file name, e.g. {example}")
