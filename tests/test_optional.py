"""medtriage.optional: a deferred import loads on first use, and a missing package says which extra installs it."""

import sys

import pytest

from medtriage.optional import MissingDependencyError, optional_import


def test_the_module_is_imported_on_first_attribute_access_only(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    colorsys = optional_import("colorsys")
    assert "colorsys" not in sys.modules
    assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    assert "colorsys" in sys.modules


def test_a_missing_package_names_the_extra_that_installs_it():
    absent = optional_import("medtriage_no_such_package", extra="wsi")
    with pytest.raises(MissingDependencyError, match=r"medtriage_no_such_package is not installed.*medtriage\[wsi\]"):
        getattr(absent, "anything")  # noqa: B009  (attribute access is the trigger)
    assert isinstance(MissingDependencyError("x"), ImportError)
