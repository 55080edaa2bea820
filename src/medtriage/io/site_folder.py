"""What in a site's export folder is input: every file but its labels file, less anything under a hidden name.

A dot first, at any depth, marks what is not the site's export: notebook checkpoints, trash folders, OS and editor
files hold copies or deleted images, which would otherwise be read as site data under ordinary names. Linked folders
are read as the folders they link to (each once, so a link loop ends). A broken link and a folder that cannot be listed
are inputs all the same: ingest lists them as unreadable rather than lose their files unsaid. Pipes, sockets and
devices hold no file of an export, and opening one may wait for ever: they are left out. Ingest (at the site) and the
pool builder (over several sites) read a site folder the same way.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

SITE_LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class SiteFolder:
    inputs: list[Path]  # sorted
    hidden: list[PurePath]  # files left out, relative to the folder, sorted

    def hidden_roots(self) -> list[PurePath]:
        """The outermost hidden names the left-out files lie under (a checkpoint folder, a trash folder, a dot-file)."""
        return sorted({PurePath(*parts[: _first_hidden(parts) + 1]) for parts in (p.parts for p in self.hidden)})


def read_site_folder(folder: Path) -> SiteFolder:
    files = sorted(p for p in _entries(folder) if p != folder / SITE_LABELS_FILE)
    relative = [p.relative_to(folder) for p in files]
    inputs = [path for path, rel in zip(files, relative) if _first_hidden(rel.parts) is None]
    return SiteFolder(inputs, [rel for rel in relative if _first_hidden(rel.parts) is not None])


def _first_hidden(parts: tuple[str, ...]) -> int | None:
    return next((i for i, name in enumerate(parts) if name.startswith(".")), None)


def _entries(folder: Path) -> Iterator[Path]:
    """Every entry under `folder` that is no folder, and every folder that cannot be listed. Hidden folders are
    walked last and without following links, so a link from one never claims a folder the export holds."""
    unlisted: list[OSError] = []
    walked: set[str] = set()
    hidden: list[Path] = []
    for top, folders, names in os.walk(folder, followlinks=True, onerror=unlisted.append):
        real = os.path.realpath(top)
        if real in walked:  # a link loop, or a folder linked twice: its files are listed once
            folders.clear()
            continue
        walked.add(real)
        hidden += [Path(top, name) for name in folders if name.startswith(".")]
        folders[:] = [name for name in folders if not name.startswith(".")]
        yield from _files(top, names)
    yield from (Path(err.filename) for err in unlisted if err.filename and Path(err.filename) != folder)
    for top, _, names in (step for path in hidden for step in os.walk(path)):
        yield from _files(top, names)


def _files(top: str, names: list[str]) -> Iterator[Path]:
    for path in (Path(top, name) for name in names):
        try:
            special = not stat.S_ISREG(path.stat().st_mode)  # a pipe, socket or device
        except OSError:  # a broken link
            special = False
        if not special:
            yield path
