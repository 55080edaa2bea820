"""The default-recipe accuracy benchmark's scoring rule and verdicts (the runs: `python -m benchmarks.accuracy_recipe`)."""

import numpy as np
import pytest

from benchmarks import accuracy_recipe


def run(seed, auc, acc, minutes=10.0):
    return {
        "seed": seed,
        "run_id": f"{seed:032d}",
        "test_auc": auc,
        "ci_low": auc - 0.01,
        "ci_high": auc + 0.005,
        "test_acc": acc,
        "youden_threshold": 0.6,
        "test_acc_argmax": acc - 0.01,
        "test_acc_finding": acc - 0.02,
        "val_auc": 0.998,
        "wall_s": minutes * 60,
    }


def verdicts(text):
    return [line for line in text.splitlines() if line.startswith("- ") and line.endswith("**")]


def test_goal_is_met_only_by_three_seeds_whose_means_reach_it():
    good = [run(0, 0.991, 0.955), run(1, 0.992, 0.951), run(2, 0.990, 0.952)]
    text = accuracy_recipe.section(good, "python -m benchmarks.accuracy_recipe", 1, quick=False, recipe="r")
    assert all(line.endswith("**met**") for line in verdicts(text))
    assert "| 0.9910 ± 0.0010 |" in text.replace("**", "") and "Google AutoML Vision | 0.991" in text
    assert all(line.endswith("**not met**") for line in verdicts(accuracy_recipe.section(good[:2], "c", 1, False, "r"))[:2])
    low_acc = [run(0, 0.995, 0.94), run(1, 0.995, 0.95), run(2, 0.995, 0.95)]
    assert [line.endswith("**met**") for line in verdicts(accuracy_recipe.section(low_acc, "c", 1, False, "r"))] == [True, False, True]
    slow = [run(s, 0.995, 0.96, minutes=16) for s in range(3)]
    assert verdicts(accuracy_recipe.section(slow, "c", 1, False, "r"))[-1].endswith("**not met**")


def test_accuracy_uses_the_threshold_chosen_on_validation(monkeypatch):
    """Validation puts the Youden threshold between 0.3 and 0.7: test ACC follows it, not 0.5."""
    val = (np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), np.array([0, 0, 0, 1, 1, 1]), np.zeros(6, bool))
    test = (np.array([0.1, 0.55, 0.45, 0.75, 0.9, 0.95]), np.array([0, 0, 1, 1, 1, 1]), np.array([0, 0, 0, 1, 1, 1], bool))
    scored = []
    monkeypatch.setattr(accuracy_recipe, "served_scores", lambda package, split: scored.append(split) or {"val": val, "test": test}[split])
    result = accuracy_recipe.score_package("pkg")
    assert scored == ["val", "test"]  # test scored once, after the threshold is fixed
    assert result["youden_threshold"] == pytest.approx(0.7)
    assert result["test_acc"] == pytest.approx(5 / 6)  # 0.55 (normal) stays below the validation threshold
    assert result["test_acc_argmax"] == pytest.approx(4 / 6) and result["test_acc_finding"] == pytest.approx(5 / 6)
    assert result["test_auc"] == pytest.approx(7 / 8) and result["n_test"] == 6


def test_the_recipe_is_described_from_its_config_not_typed_beside_it():
    from medtriage.config import compose_train_config

    base = ["experiment=pneumoniamnist_sota", "paths.output_dir=."]
    stands = accuracy_recipe.describe(compose_train_config(base))
    assert "resized to 64 px" in stands and "averages over shift test-time views" in stands
    edited = accuracy_recipe.describe(compose_train_config([*base, "trainer.max_epochs=7", "trainer.imbalance=weighted_loss"]))
    assert "7 epochs of one-cycle AdamW" in edited and "class-weighted cross-entropy" in edited


def test_seeds_found_kept_are_named_beside_the_wall_times_they_bring():
    runs = [{**run(0, 0.99, 0.95), "kept": True}, {**run(1, 0.99, 0.95), "kept": False}]
    assert "seed 0 kept from an earlier run" in accuracy_recipe.section(runs, "c", 1, False, "r")
    assert "kept from an earlier run" not in accuracy_recipe.section([run(0, 0.99, 0.95)], "c", 1, False, "r")
