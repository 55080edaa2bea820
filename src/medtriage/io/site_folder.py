"""What in a site's export folder is input: every file but its labels file, less anything under a hidden name.

A dot first, at any depth, marks what is not the site's export: notebook checkpoints, trash folders, OS and editor
files hold copies or deleted images, which would otherwise be read as site data under ordinary names. Ingest (at the
site) and the pool builder (over several sites) read a site folder the same way.
"""

from __future__ import annotations

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
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / SITE_LABELS_FILE)
    relative = [p.relative_to(folder) for p in files]
    inputs = [path for path, rel in zip(files, relative) if _first_hidden(rel.parts) is None]
    return SiteFolder(inputs, [rel for rel in relative if _first_hidden(rel.parts) is not None])


def _first_hidden(parts: tuple[str, ...]) -> int | None:
    return next((i for i, name in enumerate(parts) if name.startswith(".")), None)
