"""Logits of one split with their labels and sites: what a model produced, whatever produced it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medtriage.evaluation.metrics import softmax


@dataclass
class Predictions:
    logits: np.ndarray  # float32 [N, K]
    labels: np.ndarray  # int64 [N]
    sites: np.ndarray  # str [N]
    row_indices: np.ndarray | None = None  # positions in manifest.rows, when they came from a pool

    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)
