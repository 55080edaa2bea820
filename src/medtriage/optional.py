"""Heavy or optional dependencies, imported on first use: the one way a module defers an import.

`pd = optional_import("pandas")` at the top of a module names the dependency where readers look for
it, yet imports it only when first touched: the torch-free install has no pandas or matplotlib, and
MONAI costs seconds to import. A missing package raises MissingDependencyError naming the extra
that installs it (as MONAI's `optional_import` does).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from medtriage.errors import MedTriageError


class MissingDependencyError(MedTriageError, ImportError):
    """An optional dependency a feature needs is not installed."""


class _Deferred(ModuleType):
    def __init__(self, name: str, extra: str, before: Callable[[], None] | None):
        super().__init__(name)
        self.__dict__.update(_extra=extra, _before=before, _module=None)

    def _load(self) -> ModuleType:
        if self._module is None:
            try:
                if self._before is not None:
                    self._before()
                self.__dict__["_module"] = importlib.import_module(self.__name__)
            except ModuleNotFoundError as err:
                raise MissingDependencyError(
                    f"{self.__name__} is not installed", hint=f"install it with: pip install 'medtriage[{self._extra}]'"
                ) from err
        return self._module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)


def optional_import(name: str, extra: str = "train", before: Callable[[], None] | None = None) -> Any:
    """A stand-in for module `name` that imports it on first attribute access (`before` runs just ahead of that)."""
    return _Deferred(name, extra, before)


def _headless_matplotlib() -> None:
    importlib.import_module("matplotlib").use("Agg")  # figures are files: no display needed


def pyplot() -> Any:
    """matplotlib.pyplot with the file-only Agg backend, imported on first use."""
    return optional_import("matplotlib.pyplot", before=_headless_matplotlib)
