"""How a package's tile probabilities become one slide score: part of the contract, so export chooses slide
thresholds on scores aggregated exactly as serving aggregates them."""

from __future__ import annotations

import numpy as np

from medtriage.errors import ConfigError

AGGREGATIONS = ("mean", "top_k")
# The settings that name the method and top_k: a package's model.json `pathology` block, which serving reads.
PACKAGE_SETTINGS = ("pathology.aggregation", "pathology.top_k")


def aggregate(probabilities: np.ndarray, method: str, top_k: int, settings: tuple[str, str] = PACKAGE_SETTINGS) -> float:
    """The slide score of `probabilities` by `method`; `settings` (method, top_k) are what a refusal names."""
    if method == "mean":
        return float(probabilities.mean())
    if method == "top_k":
        return float(np.sort(probabilities)[-_tiles(top_k, settings[1]) :].mean())
    raise ConfigError(f"unknown aggregation '{method}'", where=settings[0], hint=f"one of {AGGREGATIONS}")


def _tiles(top_k: int, setting: str) -> int:
    """`top_k` as a whole number of tiles, 1 or more: the slice would take 0 as every tile, and fail on 2.5."""
    whole = isinstance(top_k, (int, np.integer, float, np.floating)) and not isinstance(top_k, bool) and float(top_k).is_integer()
    if not whole or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} is not a number of tiles", where=setting, hint="the number of top tiles averaged: 1 or more")
    return int(top_k)
