"""The statistics a served package's decisions rest on, checked against how serving computes the same values."""

from __future__ import annotations

import numpy as np
import torch

from medtriage.evaluation.calibration import probabilities
from medtriage.export.safety import drift_references
from medtriage.format.references import psi


def test_the_probability_reference_bins_the_validation_images_as_the_graph_serves_them():
    # A confident model: a quarter of validation has a logit margin above 17, where float64 probabilities still differ
    # but the graph's float32 softmax serves every one of them as 1.0.
    rng = np.random.default_rng(0)
    n = 400
    margins = np.concatenate([rng.normal(-4, 2, 200), rng.normal(6, 2, 100), rng.uniform(17.5, 25, 100)])
    logits = np.stack([np.zeros(n), margins], axis=1).astype(np.float32)
    served = torch.softmax(torch.from_numpy(logits), dim=-1)[:, 1].numpy()
    assert (served == 1.0).sum() == 100
    images = [np.full((1, 4, 4), 0.5, dtype=np.float32)] * n
    drift = drift_references(images, 1, probabilities(logits)[:, 1], np.array(["a"] * n), None)
    # The very images the reference was built from, as served, are no shift at all.
    assert psi(drift["reference"]["all"]["probability"], served) < 0.01 < drift["psi_threshold"]
