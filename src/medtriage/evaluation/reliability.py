"""Reliability diagram: top-label confidence against accuracy, before and after temperature scaling.

Bins are `calibration.confidence_bins`, those of the expected calibration error the legend shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtriage.evaluation.calibration import confidence_bins, expected_calibration_error, probabilities
from medtriage.evaluation.plots import save_figure
from medtriage.optional import pyplot

plt = pyplot()


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, path: Path, title: str, n_bins: int = 15) -> Path:
    """One panel: uncalibrated and temperature-scaled curves against the diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8, label="perfect calibration")
    for name, t, marker in (("before", 1.0, "o"), (f"after (T={temperature:.2f})", temperature, "s")):
        probs = probabilities(logits, t)
        confidence, accuracy, counts = confidence_bins(probs, labels, n_bins)
        ece = expected_calibration_error(probs, labels, n_bins)
        ax.plot(confidence, accuracy, marker=marker, label=f"{name}: ECE {ece:.3f}")
    limits = confidence_axis(np.asarray(logits).shape[1])
    ax.set(xlabel="confidence (top-label probability)", ylabel="accuracy", title=title, xlim=limits, ylim=(0.0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def confidence_axis(n_classes: int) -> tuple[float, float]:
    """The confidence axis: from a little below 1/n_classes, the least a top-label probability can be, to 1."""
    return 1.0 / n_classes - 0.05, 1.0
