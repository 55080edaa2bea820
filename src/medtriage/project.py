"""Where the project is: its root folder (configs/, models/, mlflow.db) and the git commit it stands at."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

CONFIG_DIR_NAME = "configs"


def find_project_root(start: str | Path | None = None) -> str:
    """MEDTRIAGE_ROOT, else the nearest folder upwards holding `configs/train.yaml` (from `start` or cwd, then from
    this source checkout), else cwd. The one root finder: configs, benchmarks and entry points all ask here."""
    if os.environ.get("MEDTRIAGE_ROOT"):
        return str(Path(os.environ["MEDTRIAGE_ROOT"]).resolve())
    here = Path(start or os.getcwd()).resolve()
    for origin in (here, Path(__file__).resolve().parent):
        for folder in (origin, *origin.parents):
            if (folder / CONFIG_DIR_NAME / "train.yaml").is_file():
                return str(folder)
    return str(here)


def project_path(relative: str | Path) -> Path:
    """`relative` under the project root: the data commands' default folders, wherever they are run from, the same
    folders training's `paths` group names."""
    return Path(find_project_root()) / relative


def git_commit(root: str | Path | None = None) -> tuple[str, bool]:
    """(commit hash or 'unknown', whether the working tree has uncommitted changes) of the project at `root`."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root or find_project_root(), capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
