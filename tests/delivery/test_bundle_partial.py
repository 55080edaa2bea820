"""The hidden folder a bundle is built in (`.OUT.partial`) never outlives the build, read-only package or not: a copy
that fails midway is removed whole, and one a stopped build left is removed by the next build, or named with what to
do. Root may remove a read-only folder's files, so as root each build here runs in a child process without the
capabilities that let it (tests/delivery/file_modes.py)."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

import medtriage
from medtriage.delivery import bundle as bundle_module
from medtriage.delivery.bundle import build_bundle
from tests.delivery.file_modes import drop_mode_overrides
from tests.delivery.test_bundle_offline import accept_fake_packages, fake_package

CHMOD = os.chmod  # the clean-up's, whatever a test put in its place


@pytest.fixture
def work() -> Path:
    folder = Path(tempfile.mkdtemp())
    yield folder
    for path in [folder, *folder.rglob("*")]:  # what a failing build left read-only
        if path.is_dir() and not path.is_symlink():
            CHMOD(path, 0o755)
    shutil.rmtree(folder)


def without_root(action: Callable[[], object]) -> str:
    """Run `action` bound by file modes (under root, in a forked child without the capabilities that pass over them:
    it keeps the test's monkeypatches); its outcome: "ok", or the type and text of what it raised."""
    if os.geteuid() != 0:
        return _outcome(action)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's lines run in another process
        os.close(read)
        try:
            drop_mode_overrides()
            said = _outcome(action)
        except BaseException:
            said = traceback.format_exc()
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(child, 0)
    return said


def _outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "ok"


def read_only_package(folder: Path) -> Path:
    """A package as a frozen release or a disc gives it: files 0444, folders 0555, two subfolders."""
    package = fake_package(folder, b"model")
    for sub in ("calibration", "docs"):
        (package / sub).mkdir()
        (package / sub / f"{sub}.json").write_text("[]")
    for path in sorted(package.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    package.chmod(0o555)
    return package


@pytest.fixture
def quick_downloads(monkeypatch, work):
    """build_bundle of fake packages with its own wheel given, no download and no SBOM."""
    from tests.delivery.test_bundle import _wheel

    accept_fake_packages(monkeypatch)
    monkeypatch.setattr(bundle_module, "download_dependencies", lambda own, wheels_dir, python, platform: [own])
    monkeypatch.setattr(bundle_module, "write_sbom", lambda wheels, out, pyproject, models: [])
    return _wheel(work, "medtriage", medtriage.__version__, [])


def test_a_copy_of_a_read_only_package_that_fails_midway_leaves_no_partial_folder(work, monkeypatch, quick_downloads):
    """copytree had made each subfolder it finished read-only (the package's mode) before the disk filled: removing
    the partial folder failed silently, and `.out.partial` stayed, holding the copied files."""
    package = read_only_package(work / "packages" / "pneumonia")
    copied, copy2 = [], shutil.copy2

    def full_at_the_last_file(source, target, **kwargs):  # whichever comes last, a finished subfolder is before it
        copied.append(source)
        if len(copied) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        return copy2(source, target, **kwargs)

    monkeypatch.setattr(shutil, "copy2", full_at_the_last_file)
    said = without_root(lambda: build_bundle([package], work / "out", wheel=quick_downloads))
    assert said.startswith("BuildError: ") and "No space left on device" in said, said
    assert sorted(p.name for p in work.iterdir()) == sorted(["packages", quick_downloads.name])

    monkeypatch.setattr(shutil, "copy2", copy2)  # the disk has room again: the next build passes
    assert without_root(lambda: build_bundle([package], work / "out", wheel=quick_downloads)) == "ok"
    assert (work / "out" / "models" / "pneumonia" / "docs" / "docs.json").is_file()


def stale_partial(work: Path) -> Path:
    """`.out.partial` as a build killed while copying a read-only package left it."""
    staging = work / ".out.partial"
    (staging / "models" / "pneumonia" / "calibration").mkdir(parents=True)
    (staging / "models" / "pneumonia" / "calibration" / "calibration.json").write_text("[]")
    (staging / "models" / "pneumonia" / "calibration").chmod(0o555)
    return staging


@pytest.fixture
def quick_fill(monkeypatch):
    def fill(staging, models, python, platform, wheel):
        (staging / "bundle.json").write_text("{}")
        return []

    monkeypatch.setattr(bundle_module, "_model_folders", lambda packages: {"model": Path("unused")})
    monkeypatch.setattr(bundle_module, "_fill", fill)


def test_a_read_only_partial_folder_a_killed_build_left_is_removed_by_the_next_build(work, quick_fill):
    """The next build failed with `cannot create the bundle folder here: File exists`, which named neither the
    folder in the way nor how to remove it."""
    stale_partial(work)
    assert without_root(lambda: build_bundle(["pkg"], work / "out")) == "ok"
    assert sorted(p.name for p in work.iterdir()) == ["out"] and (work / "out" / "bundle.json").is_file()


def test_a_partial_folder_the_build_cannot_remove_is_named_with_what_to_do(work, monkeypatch, quick_fill):
    staging = stale_partial(work)
    chmod = os.chmod

    def not_its_owner(path, mode, *args, **kwargs):  # as for a folder another user's build left
        if Path(path).is_relative_to(staging):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
        return chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", not_its_owner)
    said = without_root(lambda: build_bundle(["pkg"], work / "out"))
    assert said.startswith(f"ConfigError: {work / 'out'}: {staging}, where the bundle is built before it takes its name, is"), said
    assert "cannot be removed" in said, said
    assert f"chmod -R u+w {shlex.quote(str(staging))} && rm -rf {shlex.quote(str(staging))}" in said, said
    assert "then build the bundle again" in said, said
    assert not (work / "out").exists()
