"""How a package's tile probabilities become one slide score: part of the contract, so export chooses slide
thresholds on scores aggregated exactly as serving aggregates them."""

from __future__ import annotations

import numpy as np

from medtriage.errors import ConfigError

AGGREGATIONS = ("mean", "top_k")


def aggregate(probabilities: np.ndarray, method: str, top_k: int) -> float:
    if method == "mean":
        return float(probabilities.mean())
    if method == "top_k":
        k = max(1, min(top_k, len(probabilities)))
        return float(np.sort(probabilities)[-k:].mean())
    raise ConfigError(f"unknown aggregation '{method}'", hint=f"one of {AGGREGATIONS}")
