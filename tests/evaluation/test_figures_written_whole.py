"""The run's figures (ROC, per-site AUC, reliability) are written all or nothing: a write that fails half way leaves the
previous figure in place and no part of the new one."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from medtriage.evaluation.plots import plot_roc, plot_site_auc
from medtriage.evaluation.reliability import plot_reliability

CURVE = (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0]), 0.9)
DRAWINGS = {
    "roc": lambda path: plot_roc({"val": CURVE}, path, "ROC"),
    "site_auc": lambda path: plot_site_auc({"val": {"a": 0.9, "b": 0.8}}, path, "AUC per site"),
    "reliability": lambda path: plot_reliability(np.array([[2.0, -1.0], [-1.0, 2.0]] * 8), np.array([0, 1] * 8), 1.5, path, "R"),
}


@pytest.mark.parametrize("name", DRAWINGS)
def test_a_figure_cut_short_leaves_the_previous_one_whole(tmp_path, monkeypatch, name):
    path = tmp_path / "figures" / f"{name}.png"
    DRAWINGS[name](path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def cut_short(self, out, **kwargs):
        out.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(OSError):
        DRAWINGS[name](path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]
