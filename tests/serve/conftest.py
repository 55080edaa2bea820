"""Fixtures: the session's tiny model packages (see tests/export/tiny_package.py) and predictors over them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.export.tiny_package import shared_safe_package, shared_tiny_package

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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


@pytest.fixture(scope="module")
def chromium(need_tool):
    """Debian's Chromium through playwright, one per test module (each test opens its own page or context). Missing,
    it skips locally and fails in CI, like every real peer (`need_tool`)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    need_tool(str(CHROMIUM), "apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
