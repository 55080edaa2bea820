"""Fixtures: the session's tiny model packages (see tests/export/tiny_package.py) and predictors over them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.export.tiny_package import shared_safe_package, shared_tiny_package


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


@pytest.fixture(scope="session")
def safe_exported(tmp_path_factory):
    """The tiny model exported with its OOD output and drift references (ExportResult, torch ScoredNet; read-only)."""
    return shared_safe_package(tmp_path_factory)


@pytest.fixture(scope="session")
def safe_package_dir(safe_exported) -> Path:
    return safe_exported[0].package_dir


@pytest.fixture(scope="module")
def predictor(package_dir) -> Predictor:
    """One single-threaded predictor per test module over the tiny package."""
    return Predictor(load_package(package_dir), threads=1)


@pytest.fixture(scope="module")
def safe_predictor(safe_package_dir) -> Predictor:
    """One single-threaded predictor per test module over the package with OOD output and drift references."""
    return Predictor(load_package(safe_package_dir), threads=1)
