"""The selection rule of benchmarks.accuracy_selection: the incumbent recipe stays unless beaten beyond the folds' noise."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.accuracy_selection import RULE_SCORE, choose, compared, gains, select


class FoldHistory:
    """Stands in for an MLflow client: what each trial run logged per fold ({run: {"cv/<score>": values}})."""

    def __init__(self, logged: dict[str, dict[str, list[float]]]):
        self.logged = logged

    def get_metric_history(self, run_id: str, key: str):
        values = self.logged[run_id].get(key, [])
        return [SimpleNamespace(step=i, value=v) for i, v in reversed(list(enumerate(values)))]


def arrays(losses: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {label: np.array(v) for label, v in losses.items()}


def test_a_challenger_better_on_every_fold_replaces_the_default():
    losses = {"default": [0.10, 0.12, 0.11], "a": [0.08, 0.10, 0.09], "b": [0.09, 0.11, 0.10]}
    assert choose(arrays(losses), "default") == "a"


def test_a_gain_within_the_folds_noise_keeps_the_default():
    losses = {"default": [0.0561, 0.0800, 0.0760], "tie": [0.0562, 0.0800, 0.0755], "noisy": [0.03, 0.10, 0.07]}
    assert choose(arrays(losses), "default") == "default"
    gain, se = gains(arrays(losses), "default")["noisy"]
    assert gain == pytest.approx((0.0561 - 0.03 + 0.08 - 0.10 + 0.076 - 0.07) / 3) and 0 < gain < se
    assert compared(gain, se) == "within noise"


def test_differences_too_small_to_matter_are_ties_even_with_a_tiny_standard_error():
    losses = {"default": [0.0561, 0.0800, 0.0760], "same": [0.05609998, 0.07999997, 0.07599996]}
    assert choose(arrays(losses), "default") == "default"
    assert compared(*gains(arrays(losses), "default")["same"]) == "within noise"
    assert compared(0.01, 0.002) == "better" and compared(-0.01, 0.002) == "worse"


def test_the_rule_judges_the_log_loss_after_temperature_and_reports_what_the_raw_log_loss_would_choose():
    # "sharper" wins as trained only by being less over-confident; after temperature the default separates better.
    scores = {
        "default": {"none": {"log_loss": [0.080, 0.090, 0.085], RULE_SCORE: [0.050, 0.055, 0.052]}},
        "sharper": {"none": {"log_loss": [0.060, 0.070, 0.066], RULE_SCORE: [0.056, 0.060, 0.058]}},
    }
    selection = select(scores, "default")
    assert selection["chosen"] == "default" and selection["as_trained_choice"] == "sharper"
    assert compared(*selection["gains"]["sharper"]) == "worse"
    assert compared(*selection["as_trained_gains"]["sharper"]) == "better"


def _run(seed: int, minutes: float) -> dict:
    figures = {"test_auc": 0.98, "ci_low": 0.97, "ci_high": 0.99, "test_acc": 0.93, "test_acc_argmax": 0.9, "val_auc": 0.997}
    return {"seed": seed, "run_id": f"run{seed}", "wall_s": minutes * 60, **figures}


def test_the_time_target_is_judged_on_the_timed_run_when_there_is_one():
    from benchmarks.accuracy_selection import section

    fold = {"mean_log_loss": 0.07, "sd_log_loss": 0.01, "mean_brier": 0.02, "sd_brier": 0.0, "mean_auc": 0.99, "sd_auc": 0.0}
    cv = {label: {**fold, "fold_wall_s": [600.0], "run_id": label} for label in ("balanced-longer", "balanced-sampling")}
    args = SimpleNamespace(folds=3, threads=1, jobs=2, quick=False, timing_threads=2)
    runs = [_run(0, 16.0), _run(1, 15.5)]  # one thread each, two at a time: slower than alone
    text = section(
        cv,
        "balanced-longer",
        runs,
        None,
        args,
        "cmd",
        seeds_ci=(0.975, 0.986),
        timed={"seed": 0, "wall_s": 9 * 60, "threads": 2, "load_at_start": 0.3},
        selection={
            "chosen": "balanced-longer",
            "scores": {"balanced-longer": [0.05, 0.06], "balanced-sampling": [0.052, 0.061]},
            "gains": {"balanced-sampling": (-0.0015, 0.0005)},
            "as_trained_choice": "balanced-sampling",
            "as_trained_gains": {"balanced-sampling": (0.0029, 0.0005)},
        },
    )
    assert "| 0.0565 ± 0.0064 | -0.0015 ± 0.0005: worse | 0.0700 ± 0.0100 | +0.0029 ± 0.0005: better |" in text
    assert "The same rule on the log-loss as trained chooses **balanced-sampling**." in text
    assert "timed run (seed 0, load average 0.3 at its start) 9.0 min on 2 threads: **met**" in text
    assert "[0.975, 0.986]" in text
    untimed = section(cv, "balanced-longer", runs, None, SimpleNamespace(**{**vars(args), "timing_threads": 0}), "cmd")
    assert "slowest run 16.0 min on 1 thread: **not met**" in untimed
    assert "Chosen: **balanced-longer**. Test" in untimed
    assert "gain over balanced-longer ± SE" in untimed
    challenger = section(cv, "balanced-sampling", runs, None, args, "cmd")
    expected = "Chosen: **balanced-sampling**, trained with `python scripts/train.py experiment=pneumoniamnist_sota trainer.max_epochs=20`."
    assert expected in challenger


def _section_with_views(served: str, configured: str) -> str:
    from benchmarks.accuracy_selection import section

    fold = {"mean_log_loss": 0.07, "sd_log_loss": 0.01, "mean_brier": 0.02, "sd_brier": 0.0, "mean_auc": 0.99, "sd_auc": 0.0}
    cv = {"balanced-longer": {**fold, "fold_wall_s": [600.0], "run_id": "balanced-longer"}}
    args = SimpleNamespace(folds=3, threads=1, jobs=2, quick=False, timing_threads=0)
    scores = {
        "none": {"log_loss": [0.056, 0.080, 0.076], RULE_SCORE: [0.05, 0.07, 0.07], "auc": [0.997] * 3},
        "shift": {"log_loss": [0.054, 0.076, 0.073], RULE_SCORE: [0.048, 0.066, 0.067], "auc": [0.997] * 3},
    }
    averaging = {"scores": scores, "gain": (0.003, 0.0005), "served": served, "configured": configured}
    return section(cv, "balanced-longer", [_run(0, 9.0), _run(1, 9.0)], None, args, "cmd", averaging=averaging)


def test_the_served_views_and_their_agreement_with_the_recipe_config_are_stated():
    text = _section_with_views("shift", "shift")
    assert "| shift (9) | 0.0603 ± 0.0107 | +0.0030 ± 0.0005: better | 0.0677 ± 0.0119 |" in text
    assert "Served with: **shift**" in text and "`export.tta: shift`: agrees" in text
    assert "| balanced-longer + shift views seed 0 |" in text
    assert "**differs**: set `export.tta: shift` there" in _section_with_views("shift", "none")
    assert "| balanced-longer seed 0 |" in _section_with_views("none", "none")


def test_each_view_set_is_judged_against_the_views_served_before_it():
    from benchmarks.accuracy_selection import chosen_views

    def scored(*losses):
        return dict(zip(("none", "shift", "affine"), ({RULE_SCORE: folds} for folds in losses)))

    sets = ("shift", "affine")
    served, judged = chosen_views(scored([0.05, 0.07, 0.07], [0.045, 0.064, 0.066], [0.044, 0.065, 0.066]), sets)
    assert served == "shift"  # affine's small gain over shift is within the folds' noise
    assert judged["shift"][2] == "none" and compared(*judged["shift"][:2]) == "better"
    assert judged["affine"][2] == "shift" and compared(*judged["affine"][:2]) == "within noise"
    served, judged = chosen_views(scored([0.05, 0.07, 0.07], [0.049, 0.071, 0.069], [0.045, 0.066, 0.066]), sets)
    assert served == "affine" and judged["affine"][2] == "none"  # shift did not beat none, so affine is judged against none
    assert chosen_views(scored([0.05, 0.07, 0.07], [0.05, 0.07, 0.07], [0.051, 0.07, 0.07]), sets)[0] == "none"


def test_fold_models_that_do_not_reproduce_the_trials_scores_stop_the_run():
    from benchmarks.accuracy_selection import check_refolded, paired_gain

    raw, calibrated = [0.056, 0.080, 0.076], [0.050, 0.070, 0.070]
    history = FoldHistory({"old": {"cv/log_loss": raw}, "new": {"cv/log_loss": raw, f"cv/{RULE_SCORE}": calibrated}})
    rescored = {"none": {"log_loss": raw, RULE_SCORE: calibrated}}
    assert check_refolded(rescored, history, "old") is rescored  # a trial from before the score was logged
    assert check_refolded(rescored, history, "new") is rescored
    with pytest.raises(RuntimeError, match="log_loss .* the trial old logged"):
        check_refolded({"none": {"log_loss": [0.056, 0.081, 0.076], RULE_SCORE: calibrated}}, history, "old")
    with pytest.raises(RuntimeError, match=f"{RULE_SCORE} .* the trial new logged"):
        check_refolded({"none": {"log_loss": raw, RULE_SCORE: [0.050, 0.071, 0.070]}}, history, "new")
    gain, se = paired_gain([0.056, 0.080, 0.076], [0.055, 0.077, 0.074])
    assert gain == pytest.approx(0.002) and se == pytest.approx(0.000577, rel=1e-3)


def test_the_cost_of_the_views_is_stated_when_measured():
    from benchmarks.accuracy_selection import _latency_lines

    assert _latency_lines(None) == []
    (line,) = _latency_lines({"none": 5.0, "shift": 20.0})
    assert "5.0 ms without, 20.0 ms with (4.0×)" in line


def test_one_candidate_is_the_experiment_as_it_stands_and_every_candidate_is_a_different_recipe():
    from benchmarks.accuracy_selection import BASE, CANDIDATES, INCUMBENT
    from benchmarks.common import recipe_key
    from medtriage.config import compose_train_config

    assert [label for label, overrides in CANDIDATES.items() if not overrides] == [INCUMBENT]
    keys = {recipe_key(compose_train_config([*BASE, *overrides, "paths.output_dir=."])) for overrides in CANDIDATES.values()}
    assert len(keys) == len(CANDIDATES)


def test_the_candidates_judged_after_test_are_the_tail_of_the_candidate_list():
    from benchmarks.accuracy_selection import CANDIDATES, FIRST_AFTER_TEST, INCUMBENT, judged_after_test

    later = judged_after_test()
    assert later[0] == FIRST_AFTER_TEST and later == list(CANDIDATES)[-len(later) :]
    assert INCUMBENT not in later
