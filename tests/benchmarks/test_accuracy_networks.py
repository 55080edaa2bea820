"""The other-networks benchmark's section (the run is `python -m benchmarks.accuracy_networks`)."""

from argparse import Namespace

import numpy as np
import pytest

from benchmarks import accuracy_networks as bench
from benchmarks.accuracy_recipe_ensemble import greedy
from benchmarks.accuracy_selection import INCUMBENT
from tests.benchmarks.test_accuracy_recipe_ensemble import FOLDS, PER_FOLD, held_out, result
from tests.benchmarks.test_docs_figures import check_section, written_sections

NETWORK = "densenet121-10-epochs"


@pytest.fixture
def truth() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 2, FOLDS * PER_FOLD)


def section(predictions: dict, r: dict | None) -> str:
    steps = greedy(predictions)
    chosen = [s["added"] for s in steps if s["standing"] in ("start", "better")]
    trials = {label: {"run_id": f"{k}" * 32, "fold_wall_s": [600.0, 660.0, 720.0]} for k, label in enumerate(predictions)}
    return bench.section(
        predictions, trials, steps, chosen, r, "shift", Namespace(folds=3, quick=False), "python -m benchmarks.accuracy_networks"
    )


def test_a_network_with_other_errors_is_added_and_the_package_scored_once_on_test(truth):
    predictions = {INCUMBENT: held_out(np.random.default_rng(1), truth), NETWORK: held_out(np.random.default_rng(2), truth)}
    text = section(predictions, result(0.9881, 0.9391))
    assert check_section(bench.SECTION, text.split("\n", 1)[1], written_sections()) == []
    assert f"| {NETWORK} | `model=densenet121 trainer.max_epochs=10` |" in text
    assert text.count(" 11.0 |") == 2  # each network's median minutes per fold run
    assert f"Chosen: **{INCUMBENT} + {NETWORK}**." in text and "no network of RECIPES had been" in text
    assert "- test AUC 0.9881: **not met**" in text and "*published:* Google AutoML Vision | 0.991" in text


def test_a_network_that_adds_nothing_leaves_test_unscored_and_says_so(truth):
    default = held_out(np.random.default_rng(1), truth)
    text = section({INCUMBENT: default, NETWORK: dict(default)}, None)
    assert check_section(bench.SECTION, text.split("\n", 1)[1], written_sections()) == []
    assert f"Chosen: **{INCUMBENT}**." in text and "test was not scored" in text and "test AUC" not in text
    assert f"- improves it on the folds (closest: {NETWORK}, gain +0.0000 ± 0.0000: within noise): **not met**" in text
