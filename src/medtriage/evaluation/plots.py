"""Figures logged with each run: ROC curves and per-site AUC bars (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtriage.io.safe_output import write_atomic
from medtriage.optional import pyplot

plt = pyplot()


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> Path:
    """`curves`: label -> (fpr, tpr, auc)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_site_auc(values: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """`values`: split -> {site: auc}; grouped bars, one group per site."""
    sites = sorted({s for per_site in values.values() for s in per_site})
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(len(sites), 1), 3.5))
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(sites))
    for i, (split, per_site) in enumerate(values.items()):
        heights = [per_site.get(site, np.nan) for site in sites]
        ax.bar(x + i * width, heights, width, label=split)
    ax.set_xticks(x + width * (len(values) - 1) / 2, sites, rotation=20)
    ax.set(ylabel="AUC", ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """`fig` written to `path` all or nothing (a run stopped meanwhile leaves no half image to log), then closed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        write_atomic(path, lambda out: fig.savefig(out, dpi=110, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path
