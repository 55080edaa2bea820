"""The GPU recipe benchmark's recipes, its kept-stage guard and its section (the runs are `python -m benchmarks.accuracy_gpu`)."""

from argparse import Namespace

import pytest

from benchmarks import accuracy_gpu as bench
from benchmarks.accuracy_selection import select
from medtriage.config import compose_train_config
from tests.benchmarks.test_docs_figures import check_section, written_sections

ARGS = Namespace(folds=3, trainer="gpu", quick=False)


def test_candidates_are_the_default_recipe_on_the_gpu_preset_scaled_up():
    plans = bench.recipes("gpu", quick=False)
    assert plans[bench.INCUMBENT] == bench.BASE  # the default recipe as it stands, on its own preset
    configs = {label: compose_train_config([*plan, "paths.output_dir=."]) for label, plan in plans.items()}
    assert str(configs[bench.INCUMBENT].trainer.device) == "Device.cpu"
    for label in bench.GPU_CANDIDATES:
        cfg = configs[label]
        assert str(cfg.trainer.device) == "Device.cuda" and cfg.model.preprocess.size == 128
        assert cfg.trainer.max_epochs == 2 * configs[bench.INCUMBENT].trainer.max_epochs
        assert cfg.trainer.ema_decay == configs[bench.INCUMBENT].trainer.ema_decay  # the rest of the recipe is kept
    assert {configs[label].model.name for label in bench.GPU_CANDIDATES} == {"resnet18", "resnet50"}


def test_the_default_recipes_folds_must_be_kept_not_retrained(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `python -m benchmarks.accuracy_selection` first"):
        bench.cross_validated(["experiment=x"], None, "key", tmp_path, folds=3, need_kept=True)


def cv_stage(run_id: str) -> dict:
    return {"run_id": run_id, "mean_log_loss": 0.07, "mean_auc": 0.996, "sd_auc": 0.001, "fold_wall_s": [60.0, 60.0, 60.0]}


def folds(losses: list[float]) -> dict:
    return {"none": {"calibrated_log_loss": losses, "log_loss": losses}}


def section(scores: dict, runs: list[dict], combined=None) -> str:
    selection = select({label: folds(losses) for label, losses in scores.items()}, bench.INCUMBENT)
    cv = {label: cv_stage(f"{i}" * 32) for i, label in enumerate(scores)}
    return bench.section(cv, selection["chosen"], selection, runs, combined, (0.99, 0.998), ARGS, "python -m benchmarks.accuracy_gpu")


def test_no_candidate_better_on_the_folds_means_nothing_is_scored_on_test():
    text = section({bench.INCUMBENT: [0.05, 0.06, 0.055], "gpu-resnet18-128": [0.049, 0.062, 0.056], "gpu-resnet50-128": [0.06] * 3}, [])
    assert check_section(bench.SECTION, text.split("\n", 1)[1], written_sections()) == []
    assert "nothing was trained or scored on test" in text and "| model | test AUC" not in text
    assert "closest: gpu-resnet18-128, gain -0.0007 ± 0.0009: within noise): **not met**" in text


def run(seed: int, auc: float, acc: float) -> dict:
    return {"seed": seed, "test_auc": auc, "ci_low": auc - 0.01, "ci_high": auc + 0.005, "test_acc": acc,
            "test_acc_argmax": acc, "val_auc": 0.999, "wall_s": 90.0, "run_id": f"{seed}" * 32}  # fmt: skip


def test_a_better_candidate_is_scored_on_test_and_judged_against_the_targets():
    scores = {bench.INCUMBENT: [0.05, 0.06, 0.055], "gpu-resnet18-128": [0.04, 0.05, 0.045], "gpu-resnet50-128": [0.06] * 3}
    runs = [run(0, 0.991, 0.951), run(1, 0.993, 0.955), run(2, 0.992, 0.953)]
    text = section(scores, runs, combined={**run(9, 0.994, 0.96), "run_id": "e" * 32})
    assert check_section(bench.SECTION, text.split("\n", 1)[1], written_sections()) == []
    assert "Chosen: **gpu-resnet18-128**, trained with `python scripts/train.py experiment=pneumoniamnist_sota trainer=gpu" in text
    assert "| **gpu-resnet18-128, mean ± sd of 3 seeds** | **0.9920 ± 0.0010** | [0.990, 0.998] |" in text
    assert "- mean test AUC 0.9920: **met**" in text and "- best of seeds' mean and ensemble, test AUC 0.9940: **met**" in text
    worse = section(scores, [run(0, 0.986, 0.94), *runs[1:]])
    assert "- mean test AUC 0.9903: **met**" in worse and "- mean test ACC 0.9493: **not met**" in worse
