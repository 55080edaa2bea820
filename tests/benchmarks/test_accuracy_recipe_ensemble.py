"""The recipe-ensemble benchmark's rule and section (the run is `python -m benchmarks.accuracy_recipe_ensemble`)."""

from argparse import Namespace

import numpy as np
import pytest

from benchmarks import accuracy_recipe_ensemble as bench
from tests.benchmarks.test_accuracy_folds import result as folds_result
from tests.benchmarks.test_docs_figures import check_section, written_sections

FOLDS, PER_FOLD = 3, 400


def held_out(signal_noise: np.random.Generator, truth: np.ndarray) -> dict:
    """One recipe's out-of-fold probabilities: the true class seen through the recipe's own noise."""
    logit = 3.0 * (2 * truth - 1) + signal_noise.normal(0.0, 2.0, truth.size)
    return {
        "rows": list(range(truth.size)),
        "labels": truth.tolist(),
        "folds": np.repeat(np.arange(FOLDS), PER_FOLD).tolist(),
        "p": (1 / (1 + np.exp(-logit))).tolist(),
    }


@pytest.fixture
def predictions() -> dict[str, dict]:
    truth = np.random.default_rng(0).integers(0, 2, FOLDS * PER_FOLD)
    default = held_out(np.random.default_rng(1), truth)
    return {"default": default, "copy": dict(default), "other-errors": held_out(np.random.default_rng(2), truth)}


def test_selection_adds_a_recipe_with_other_errors_and_stops_at_one_that_adds_nothing(predictions):
    steps = bench.greedy(predictions)
    assert [(s["added"], s["standing"]) for s in steps][:2] == [("default", "start"), ("other-errors", "better")]
    assert steps[-1]["added"] == "copy" and steps[-1]["standing"] != "better" and len(steps) == 3
    assert np.mean(steps[1]["losses"]) < np.mean(steps[0]["losses"])
    assert bench.fold_losses(predictions, ["default", "copy"]) == pytest.approx(bench.fold_losses(predictions, ["default"]))


def test_a_recipe_that_holds_out_other_images_is_refused(predictions):
    shifted = dict(predictions["other-errors"], folds=np.roll(predictions["other-errors"]["folds"], 1).tolist())
    with pytest.raises(RuntimeError, match="not cut alike"):
        bench.fold_losses({**predictions, "other-errors": shifted}, ["default", "other-errors"])


def result(test_auc: float, test_acc: float) -> dict:
    unusual = {"flagged": 33, "images": 624, "false_alarm_rate": 0.01, "flagged_by_label": {"normal": 32, "pneumonia": 1}}
    return {**folds_result(test_auc, test_acc), "members": 6, "youden_threshold": 0.7123, "test_unusual": unusual}


def section(predictions: dict, r: dict | None) -> str:
    steps = bench.greedy(predictions)
    chosen = [s["added"] for s in steps if s["standing"] in ("start", "better")]
    trials = {label: {"run_id": f"{k}" * 32} for k, label in enumerate(predictions)}
    recipes = {"default": [], "copy": ["trainer.seed=0"], "other-errors": ["model=resnet10"]}
    original, bench.RECIPES = bench.RECIPES, recipes
    try:
        return bench.section(
            predictions, trials, steps, chosen, r, "shift", Namespace(folds=3, quick=False), "python -m benchmarks.accuracy_recipe_ensemble"
        )
    finally:
        bench.RECIPES = original


def test_the_section_reports_each_recipe_the_selection_and_the_test_verdicts(predictions):
    text = section(predictions, result(0.9881, 0.9391))
    assert check_section(bench.SECTION, text.split("\n", 1)[1], written_sections()) == []
    assert "| default + other-errors + copy |" in text and "(not added)" in text and "Chosen: **default + other-errors**." in text
    assert "| default + other-errors: ensemble of their 6 fold models, shift views | 0.9881 | [0.981, 0.995] | 0.9391 (t = 0.712) |" in text
    assert "- test AUC 0.9881: **not met**" in text and "- test ACC 0.9391: **not met**" in text
    assert "*published:* Google AutoML Vision | 0.991" in text
    assert "flag 1% of the out-of-fold images as unusual; it flags 33 of the 624 test images (5.3%; 32 normal, 1 pneumonia)" in text
    assert "unusual" not in section(predictions, {**result(0.9881, 0.9391), "test_unusual": {}})  # a package without OOD score
    assert "- test AUC 0.9903: **met**" in section(predictions, result(0.9903, 0.9503))


def test_nothing_chosen_beyond_the_default_points_to_the_fold_ensemble(predictions):
    text = section({"default": predictions["default"], "copy": predictions["copy"]}, None)
    assert "Chosen: **default**." in text and "`## Accuracy: fold ensemble`" in text and "test AUC" not in text


def test_candidates_added_after_a_test_score_are_named_and_a_new_choice_says_what_was_scored_before(predictions):
    later = {"default": [], bench.FIRST_AFTER_TEST: ["model=resnet10"], "last": ["trainer.seed=1"]}
    original, bench.RECIPES = bench.RECIPES, later
    try:
        history = bench.history_lines()
        seen = bench.test_lines(result(0.9881, 0.9391), ["default", "last"], "shift")
        first = bench.test_lines(result(0.9881, 0.9391), list(bench.FIRST_TESTED), "shift")
    finally:
        bench.RECIPES = original
    assert f"{bench.FIRST_AFTER_TEST}, last joined the candidates afterwards" in history[0]
    assert f"and so had {' + '.join(bench.FIRST_TESTED)}" in "\n".join(seen) and "and so had" not in "\n".join(first)
    assert seen[-1].startswith("- a second look at test: ") and not first[-1].startswith("- a second look")
