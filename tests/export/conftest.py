"""Fixtures: the session's tiny model package (see tiny_package.py)."""

from __future__ import annotations

import pytest

from tests.export.tiny_package import shared_tiny_package


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """ExportResult and the torch model it came from (read-only)."""
    return shared_tiny_package(tmp_path_factory)
