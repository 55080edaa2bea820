"""The test-time views benchmark's decision and section (the run is `python -m benchmarks.accuracy_views`)."""

from argparse import Namespace

from benchmarks import accuracy_views as bench
from benchmarks.accuracy_selection import RULE_SCORE, chosen_views
from tests.benchmarks.test_docs_figures import check_section, written_sections

ARGS = Namespace(folds=3, quick=False)
LATENCY = {"none": 3.0, "shift": 12.0, "affine": 17.0}
TRIAL = {"run_id": "b37f0907" * 4}


def fold_scores(*losses: list[float]) -> dict:
    return {views: {RULE_SCORE: folds, "log_loss": folds, "auc": [0.997] * 3} for views, folds in zip(("none", *bench.VIEW_SETS), losses)}


def section(scores: dict, configured: str = "shift") -> str:
    served, judged = chosen_views(scores, bench.VIEW_SETS)
    return bench.section(scores, served, judged, LATENCY, configured, TRIAL, ARGS, "python -m benchmarks.accuracy_views")


def test_views_that_do_not_beat_the_shifts_beyond_the_noise_are_not_served():
    text = section(fold_scores([0.046, 0.063, 0.057], [0.041, 0.054, 0.052], [0.042, 0.054, 0.052]))
    assert check_section(bench.SECTION, text.split("\n", 1)[1], written_sections()) == []
    assert "| shift (9) | 0.0490 ± 0.0070 | +0.0063 ± 0.0013: better (over none) |" in text
    assert "| affine (13) | 0.0493 ± 0.0064 | -0.0003 ± 0.0003: within noise (over shift) |" in text
    assert "| 17.0 |" in text and "trial run `b37f0907`" in text
    assert "Served with: **shift**" in text and "`export.tta: shift`: agrees" in text
    assert "- none of affine: **not met**" in text


def test_views_better_on_the_folds_are_served_and_the_config_is_told_to_follow():
    text = section(fold_scores([0.046, 0.063, 0.057], [0.041, 0.054, 0.052], [0.039, 0.050, 0.049]))
    assert "Served with: **affine**" in text and "**differs**: set `export.tta: affine` there" in text
    assert "- affine: **met**" in text
