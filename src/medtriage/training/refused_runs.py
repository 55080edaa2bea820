"""The folder of a run refused before it trained: removed, so that repeated mistakes do not fill the runs folder.

A run refused before training (a data file that is not there, a value the project's checks refuse, a failed leakage
audit) leaves in the folder Hydra made for it only Hydra's copy of its config (.hydra/), its job log (empty of the
error: that goes to the terminal) and, once it claimed its checkpoints, checkpoints/training.lock. No MLflow run
names the folder and no checkpoint is in it; the command line that was refused says all the copy would. A run that
started training (`training_started`: its MLflow run names the folder, its checkpoints resume it) keeps its folder,
whatever ends it, and so does a folder holding anything else.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medtriage.errors import MedTriageError
from medtriage.io.safe_output import try_lock

HYDRA_COPY = ".hydra"
CHECKPOINTS = "checkpoints"

_started: list[bool] = []  # one flag per folder watched by `removed_when_refused`, innermost last


@contextmanager
def removed_when_refused(folder: Path | None) -> Iterator[None]:
    """Remove `folder` when the block raises a MedTriageError (a refusal, which says what to fix) before
    `training_started` was called in it, and the folder holds nothing but what a refused run leaves there. Another
    exception (a bug) keeps it: its config copy helps to report the bug. None: nothing to watch."""
    _started.append(False)
    try:
        yield
    except MedTriageError:
        if folder is not None and not _started[-1]:
            remove_untrained(Path(folder))
        raise
    finally:
        _started.pop()


def training_started() -> None:
    """The run is about to be tracked and to train: its folder is kept from now on, however the run ends."""
    if _started:
        _started[-1] = True


def remove_untrained(folder: Path) -> bool:
    """Remove `folder` when it holds only what a run refused before training leaves (`untrained`) and no other
    process holds its checkpoints' lock (runs started in the same second share Hydra's folder); whether it was."""
    from medtriage.training.job import TRAINING_LOCK  # here: job imports this module

    if not untrained(folder, TRAINING_LOCK):
        return False
    lock = folder / CHECKPOINTS / TRAINING_LOCK
    descriptor = os.open(lock, os.O_RDWR) if lock.is_file() else None
    try:
        if descriptor is not None and try_lock(descriptor) is False:
            return False  # another run trains in this folder
        shutil.rmtree(folder, ignore_errors=True)  # best effort: the refusal is what the command reports
    finally:
        if descriptor is not None:
            os.close(descriptor)
    return not folder.exists()


def untrained(folder: Path, lock: str) -> bool:
    """Whether `folder` holds nothing but Hydra's config copy, job logs, and a checkpoints folder with at most `lock`."""
    if not folder.is_dir():
        return False
    for entry in folder.iterdir():
        if entry.name == HYDRA_COPY and entry.is_dir() and not entry.is_symlink():
            continue
        if entry.suffix == ".log" and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name == CHECKPOINTS and entry.is_dir() and not entry.is_symlink():
            if all(inner.name == lock and inner.is_file() for inner in entry.iterdir()):
                continue
        return False
    return True
