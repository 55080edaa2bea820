"""Reliability diagram: top-label confidence against accuracy, before and after temperature scaling.

Bins are the equal-width ones of `calibration.expected_calibration_error` (whose value the legend shows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtriage.evaluation.calibration import expected_calibration_error, probabilities
from medtriage.optional import pyplot

plt = pyplot()


def confidence_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, image count) of each non-empty bin."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    used = np.unique(bins)
    return (
        np.array([confidence[bins == b].mean() for b in used]),
        np.array([correct[bins == b].mean() for b in used]),
        np.array([(bins == b).sum() for b in used]),
    )


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, path: Path, title: str, n_bins: int = 15) -> Path:
    """One panel: uncalibrated and temperature-scaled curves against the diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8, label="perfect calibration")
    for name, t, marker in (("before", 1.0, "o"), (f"after (T={temperature:.2f})", temperature, "s")):
        probs = probabilities(logits, t)
        confidence, accuracy, counts = confidence_bins(probs, labels, n_bins)
        ece = expected_calibration_error(probs, labels, n_bins)
        ax.plot(confidence, accuracy, marker=marker, label=f"{name}: ECE {ece:.3f}")
    ax.set(xlabel="confidence (top-label probability)", ylabel="accuracy", title=title, xlim=(0.45, 1.0), ylim=(0.0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
