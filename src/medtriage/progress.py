"""Progress of a long loop (a training epoch, a pool's decoding): a tqdm bar on a terminal; elsewhere (stderr redirected
to a file, a SLURM log) plain lines at a modest rate, as every redraw of a bar would stay in the file as one more
carriage-return update."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from tqdm import std
from tqdm.auto import tqdm

NOTEBOOK = any(base.__module__ == "tqdm.notebook" for base in tqdm.__mro__)  # tqdm.auto's choice
LINE_EVERY_S = 60.0  # without a terminal: at most one line a minute while a loop runs, and one as it ends


def progress(
    iterable: Iterable | None,
    total: int,
    desc: str,
    unit: str = "batch",
    units: str | None = None,
    disable: bool = False,
    file: TextIO | None = None,
    leave: bool = True,
):
    """`iterable` (None: counted by hand with `update`) with progress on `file` (stderr by default): a tqdm bar on a terminal or in a notebook (whose stderr
    is no terminal, but draws tqdm.auto's widget), else `ProgressLines` counting `units` (`unit` + "s" by default). `leave`:
    the bar stays once done (a line log keeps its lines)."""
    file = sys.stderr if file is None else file
    if disable or NOTEBOOK or _is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file, leave=leave)
    return ProgressLines(iterable, total, desc, file, units=units or f"{unit}s")


def _is_terminal(file: TextIO) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class ProgressLines:
    """What a tqdm bar shows (steps done, share, time, `set_postfix` values), as a plain line once `every_s` seconds
    have passed since the last one, and once more on `close`. A log that can no longer be written (its reader gone,
    `2>&1 | head`; its disk full) gets no more lines: the loop it reports on goes on."""

    def __init__(
        self,
        iterable: Iterable | None,
        total: int,
        desc: str,
        file: TextIO,
        units: str = "batches",
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.iterable, self.total, self.desc, self.file, self.units = iterable, total, desc, file, units
        self.every_s, self.clock = LINE_EVERY_S if every_s is None else every_s, clock
        self.n, self.postfix, self.closed = 0, {}, False
        self.started = self.last_line = clock()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()  # run to its end (as a tqdm bar closes itself)

    def update(self, n: int = 1) -> None:
        """`n` more done (a bar counted by hand, made without an iterable, as tqdm's `update`)."""
        self.n += n
        if (now := self.clock()) - self.last_line >= self.every_s:
            self._line(now)

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(self.clock())

    def _line(self, now: float) -> None:
        self.last_line = now
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        parts = [f"{self.n}/{self.total} {self.units}{share} in {std.tqdm.format_interval(now - self.started)}"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        if self.file is None:
            return
        try:
            print(f"{self.desc}: {', '.join(parts)}", file=self.file, flush=True)
        except (OSError, ValueError):  # ValueError: a closed file
            self.file = None
