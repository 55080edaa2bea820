"""Fixtures: the session's tiny model package (see tests/export/tiny_package.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from tiny_package import shared_tiny_package  # noqa: E402


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """ExportResult and the torch model it came from (read-only: copy the package before changing it)."""
    return shared_tiny_package(tmp_path_factory)


@pytest.fixture(scope="session")
def package_dir(exported) -> Path:
    return exported[0].package_dir


@pytest.fixture
def package_copy(package_dir, tmp_path) -> Path:
    """A private copy of the package that a test may tamper with."""
    return Path(shutil.copytree(package_dir, tmp_path / package_dir.name))
