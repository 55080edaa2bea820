"""The target's marker values are those pip assumes for `--python-version`, and a pip download that fails names
what it was fetching and what to do (real pip, offline: an empty wheel folder is its only source)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker

from medtriage.delivery import wheelhouse
from medtriage.delivery.wheelhouse import DEFAULT_PLATFORM, BuildError, download_dependencies, target_environment


def _installable_wheel(folder: Path, name: str, requires: list[str]) -> Path:
    """A pure-Python wheel of version 1.0 pip accepts: METADATA (with `requires`), WHEEL and RECORD."""
    path, info = folder / f"{name}-1.0-py3-none-any.whl", f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{needs}")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def test_a_target_named_by_minor_version_is_its_first_release_as_pip_takes_it():
    """pip pads `--python-version 3.11` to 3.11.0 when it judges Requires-Python; the markers use the same version."""
    environment = target_environment("3.11", DEFAULT_PLATFORM)
    assert environment["python_full_version"] == environment["implementation_version"] == "3.11.0"
    assert Marker('python_full_version >= "3.11"').evaluate(environment)
    assert not Marker('python_full_version >= "3.11.1"').evaluate(environment)
    assert Marker('python_full_version < "3.11.1" and python_version == "3.11"').evaluate(environment)


def test_a_target_named_with_its_patch_release_keeps_python_version_to_major_and_minor():
    environment = target_environment("3.11.4", DEFAULT_PLATFORM)  # as pip accepts `--python-version 3.11.4`
    assert environment["python_version"] == "3.11" and environment["python_full_version"] == "3.11.4"
    assert Marker('python_full_version >= "3.11.1" and python_version < "3.12"').evaluate(environment)


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """pip as a machine without internet access runs it: no index, one empty wheel folder."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))


def test_a_failed_pip_download_names_what_it_fetched_and_how_to_give_pip_a_source(tmp_path, offline_pip):
    app = _installable_wheel(tmp_path, "app", ["absent-dependency>=1"])
    with pytest.raises(BuildError, match="absent-dependency") as failed:
        download_dependencies(app, tmp_path / "wheels", "3.11", DEFAULT_PLATFORM)
    assert str(app) in failed.value.where and str(tmp_path / "wheels") in failed.value.where
    assert "--platform" in failed.value.hint and "PIP_FIND_LINKS" in failed.value.hint


def test_a_full_disk_under_the_pip_download_is_named_with_what_to_do(tmp_path, monkeypatch):
    """pip reports an OSError as "ERROR: Exception:" and a traceback: that line alone was the message, with a hint
    about the target and the index."""
    output = "Collecting app\nERROR: Exception:\nTraceback (most recent call last):\nOSError: [Errno 28] No space left on device\n"
    popen = subprocess.Popen
    pip = [sys.executable, "-c", f"import sys; sys.stdout.write({output!r}); sys.exit(2)"]
    monkeypatch.setattr(wheelhouse.subprocess, "Popen", lambda command, **kwargs: popen(pip, **kwargs))
    app = _installable_wheel(tmp_path, "app", [])
    with pytest.raises(BuildError, match=r"OSError: \[Errno 28\] No space left on device") as failed:
        download_dependencies(app, tmp_path / "wheels", "3.11", DEFAULT_PLATFORM)
    assert failed.value.where == str(tmp_path / "wheels") and "free space" in failed.value.hint
