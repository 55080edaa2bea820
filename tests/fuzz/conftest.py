"""The session's tiny model package (tests/export/tiny_package.py), for the scoring and HTTP targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.tiny_package import shared_tiny_package


@pytest.fixture(scope="session")
def package_dir(tmp_path_factory) -> Path:
    return shared_tiny_package(tmp_path_factory)[0].package_dir
