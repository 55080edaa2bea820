"""What a new ML engineer runs into on the training side, each answered where it starts and saying what to do:

- `+trainer.lr_warmup=2` (the `+` Hydra's own message suggests for a misspelt key) trained, the setting read by nothing;
- `trainer.resume_from=<a mistyped path>` said "no unfinished run has a checkpoint", as if it had searched for one;
- a cross-validation with more folds than a class has patients trained the folds before the one that could not be
  cut, then said only "fold 2 failed (exit 2)", the reason left in that fold's log;
- Ctrl-C (or SIGTERM) during the export after a finished training said only "stopped": not that the training is kept,
  nor how to export it (a resume finds nothing to resume: the run finished)."""

from __future__ import annotations

import subprocess
from dataclasses import asdict

import numpy as np
import pytest
from omegaconf import OmegaConf

from medtriage.config import check_values, compose_train_config
from medtriage.errors import ConfigError, DataNotFoundError

ROOT_OVERRIDES = ["experiment=pneumoniamnist", "paths.output_dir=."]


@pytest.mark.parametrize("added", ["+trainer.lr_warmup=2", "+data.augment.flip=true", "+epochs=3"])
def test_a_key_added_past_the_schema_is_refused_naming_it(added):
    with pytest.raises(ConfigError) as refused:
        check_values(compose_train_config([*ROOT_OVERRIDES, added]))
    key = added[1:].split("=")[0]
    assert refused.value.where == "config" and f"{key} (no such setting" in str(refused.value)


def test_resume_from_a_path_that_is_not_there_says_so(tmp_path):
    from medtriage.training.resume import find_resume_checkpoint

    with pytest.raises(DataNotFoundError) as refused:
        find_resume_checkpoint(str(tmp_path / "runs" / "mistyped"), tmp_path / "runs", "exp")
    assert "names no file or folder" in refused.value.reason and "no unfinished run" not in str(refused.value)
    assert refused.value.where == str(tmp_path / "runs" / "mistyped")


def test_resume_from_a_folder_without_a_checkpoint_says_what_it_lacks(tmp_path):
    from medtriage.training.resume import find_resume_checkpoint

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run stopped before its first epoch was checkpointed
    with pytest.raises(DataNotFoundError) as refused:
        find_resume_checkpoint(str(tmp_path / "run"), tmp_path, "exp")
    assert "without checkpoints/last.pt" in refused.value.reason and "without trainer.resume_from" in refused.value.hint


@pytest.fixture
def few_normal_npz(tmp_path):
    """An npz whose labelled splits hold 4 normal images (patients) among 44: 5 folds leave one without any."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (normal, pneumonia) in {"train": (3, 30), "val": (1, 10), "test": (5, 5)}.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (normal + pneumonia, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([[0]] * normal + [[1]] * pneumonia, dtype=np.uint8)
    np.savez(tmp_path / "few.npz", **arrays)
    return tmp_path / "few.npz"


def test_a_fold_that_cannot_be_cut_is_refused_before_any_fold_trains(tmp_path, few_normal_npz, monkeypatch):
    from medtriage.workflows import cross_validation

    def no_fold_may_train(*args, **kwargs):
        raise AssertionError("a fold was started")

    monkeypatch.setattr(cross_validation, "_run_folds", no_fold_may_train)
    overrides = [
        "experiment=pneumoniamnist",
        f"data.npz_path={few_normal_npz}",
        f"data.pool_dir={tmp_path}/pool",
        f"paths.runs_dir={tmp_path}/runs",
        "cv.folds=5",
    ]
    with pytest.raises(ConfigError) as refused:
        cross_validation.cross_validate(overrides, tmp_path / "cv")
    assert refused.value.where == "data.cv_folds" and "no validation images of the negative class" in str(refused.value)


def test_a_failed_fold_names_its_reason_not_only_its_log(tmp_path):
    from medtriage.workflows.cross_validation import Fold, FoldFailedError, _finished

    fold = Fold(2, tmp_path / "fold2")
    fold.output_dir.mkdir()
    reason = "data.cv_folds: fold 2 of 5 has no validation images of the negative class (use fewer folds)"
    (fold.output_dir / "train.log").write_text(f"pool ...\nsome warning\nerror: {reason}\n")
    process = subprocess.Popen(["false"])
    process.wait()
    with pytest.raises(FoldFailedError) as failed:
        _finished([(fold, process, 0.0)], 5)
    assert reason in str(failed.value) and failed.value.where == str(fold.output_dir / "train.log")


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    """A training that finished (training.run answers it at once) with a real, untrained checkpoint."""
    from medtriage import training
    from medtriage.model.checkpoint import save_checkpoint
    from medtriage.model.networks import PreprocessSpec, build_triage_net
    from medtriage.training.job import RunResult

    spec = PreprocessSpec(size=28, in_channels=1)
    config = {"model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(spec)}, "data": {"label_names": ["a", "b"]}}
    checkpoint = save_checkpoint(
        tmp_path / "checkpoints" / "best.pt", model=build_triage_net("resnet10", 2, spec).state_dict(), config=config
    )
    result = RunResult(run_id="3f2a9c", best_val_auc=0.9, checkpoint=checkpoint, output_dir=checkpoint.parent)
    monkeypatch.setattr(training, "run", lambda cfg: result)
    return result


def test_an_export_stopped_after_training_says_the_training_is_kept_and_how_to_export_it(finished_run, tmp_path, monkeypatch, capsys):
    import medtriage.workflows.train_and_export as workflow

    def stopped(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "export_run", stopped)
    cfg = OmegaConf.create({"export": {"enabled": True, "models_dir": str(tmp_path / "models"), "name": "x"}, "data": {}})
    with pytest.raises(KeyboardInterrupt):
        workflow.train_and_export(cfg)
    err = capsys.readouterr().err
    assert "training itself finished and is kept" in err and "python scripts/export.py run_id=3f2a9c" in err
