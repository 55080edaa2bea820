"""Edge cases on the way from a pool to a tracked run: identifiers read back verbatim, resuming only the same data,
and no MLflow parent run left RUNNING when a sweep job fails."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hydra.core.utils import JobReturn, JobStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from medtriage.config import compose_train_config, to_plain_dict
from medtriage.data.audit import audit_manifest
from medtriage.data.holdout import hold_out_site
from medtriage.data.manifest import PoolWriter
from medtriage.errors import ConfigError
from medtriage.model.checkpoint import save_checkpoint
from medtriage.training import job, tracking
from medtriage.training.resume import RESUME_KEYS
from medtriage.training.tracking import PARENT_RUN_ENV, MultirunParentRun


@pytest.fixture
def numeric_looking_pool(tmp_path):
    """Sites named "01"/"02", a pseudonym "NA" and UIDs that look like numbers: all text, as the hospitals wrote them."""
    writer = PoolWriter(tmp_path / "pool", ["normal", "pneumonia"])
    rng = np.random.default_rng(0)
    rows = [
        ("01", "NA", "train", 1, "1.20"),
        ("01", "NA", "test", 0, "1.2"),  # one patient in two splits: the audit must see it
        ("01", "p2", "val", 1, "1.3"),
        ("01", "p3", "test", 1, "1.4"),
        ("02", "007", "train", 1, "1.5"),
        ("02", "p5", "val", 1, "1.6"),
        ("02", "p6", "test", 1, "1.7"),
    ]
    for i, (site, patient, split, label, series) in enumerate(rows):
        writer.add(
            rng.random((1, 8, 8)),
            site=site,
            patient_id=patient,
            study_uid=series,
            series_uid=series,
            sop_uid=f"2.{i}",
            path=f"{site}/{i}.dcm",
            label=label,
            split=split,
        )
    return writer.close()


def test_identifiers_are_read_back_as_written(numeric_looking_pool):
    rows = numeric_looking_pool.rows
    assert numeric_looking_pool.sites == ["01", "02"]
    assert rows["patient_id"].tolist()[:2] == ["NA", "NA"] and "007" in rows["patient_id"].tolist()
    assert rows["series_uid"].tolist()[:2] == ["1.20", "1.2"]  # two series, not one number


def test_a_site_with_a_numeric_looking_name_can_be_held_out(numeric_looking_pool):
    held = hold_out_site(numeric_looking_pool, "01")
    assert set(held.split("test")["site"]) == {"01"}


def test_a_patient_pseudonymised_as_na_in_two_splits_fails_the_audit(numeric_looking_pool):
    result = audit_manifest(numeric_looking_pool, check_images=False)
    leaked = [f for f in result.findings if f.kind == "patient_in_two_splits"]
    assert not result.ok and leaked and leaked[0].examples[0]["patient_id"] == "NA"


def _resumable(path, **fields):
    """A checkpoint holding every key a resume reads (`fields`, the others as placeholders)."""
    return save_checkpoint(path, **({key: 0 for key in RESUME_KEYS} | fields))


def _config(tmp_path, *extra):
    return compose_train_config(
        [
            "experiment=pneumoniamnist",
            "model=resnet10",
            "model.preprocess.size=28",
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.runs_dir={tmp_path / 'runs'}",
            "data.cv_folds=5",
            *extra,
        ]
    )


def test_resuming_with_other_data_is_refused_before_any_training(tmp_path, monkeypatch):
    checkpoint = _resumable(tmp_path / "last.pt", config=to_plain_dict(_config(tmp_path, "data.cv_fold=0")), mlflow_run_id="x")

    def reached_training(*args, **kwargs):
        raise AssertionError("the run went on to load data for a checkpoint trained on another fold")

    monkeypatch.setattr(job, "load_data", reached_training)
    with pytest.raises(ConfigError, match="cv_fold") as refused:
        job.run(_config(tmp_path, "data.cv_fold=1", "trainer.resume=true", f"trainer.resume_from={checkpoint}"))
    assert str(checkpoint) in str(refused.value)


def test_resuming_with_another_recipe_is_refused_before_any_training(tmp_path, monkeypatch):
    checkpoint = _resumable(tmp_path / "last.pt", config=to_plain_dict(_config(tmp_path)), mlflow_run_id="x")

    def reached_training(*args, **kwargs):
        raise AssertionError("the run went on with another learning rate and schedule length than its checkpoint's")

    monkeypatch.setattr(job, "load_data", reached_training)
    resume = ("trainer.resume=true", f"trainer.resume_from={checkpoint}")
    with pytest.raises(
        ConfigError, match=r"trainer\.max_epochs: 3 in the checkpoint, 9 now; trainer\.lr: 0\.001 in the checkpoint, 0\.01 now"
    ) as refused:
        job.run(_config(tmp_path, "trainer.lr=0.01", "trainer.max_epochs=9", *resume))
    assert str(checkpoint) in str(refused.value)


def test_resuming_with_another_model_names_the_settings_that_differ(tmp_path, monkeypatch):
    checkpoint = _resumable(tmp_path / "last.pt", config=to_plain_dict(_config(tmp_path)), mlflow_run_id="x")
    monkeypatch.setattr(job, "load_data", lambda *args: pytest.fail("the run went on with another network input size"))
    with pytest.raises(ConfigError, match=r"model\.preprocess\.size: 28 in the checkpoint, 32 now\)") as refused:
        job.run(_config(tmp_path, "model.preprocess.size=32", "trainer.resume=true", f"trainer.resume_from={checkpoint}"))
    assert refused.value.where == str(checkpoint) and "trainer.resume" in refused.value.hint


@pytest.mark.parametrize("runtime", ["data.num_workers=2", "trainer.eval_batch_size=64", "trainer.precision=fp32"])
def test_resuming_with_the_same_recipe_on_other_runtime_settings_goes_on(tmp_path, monkeypatch, runtime):
    uri = os.environ["MLFLOW_TRACKING_URI"]  # the run the checkpoint names must be in the store: it is checked first
    run_id = MlflowClient(uri).create_run(tracking.experiment_id(uri, "edges")).info.run_id
    checkpoint = _resumable(tmp_path / "last.pt", config=to_plain_dict(_config(tmp_path)), mlflow_run_id=run_id)

    class Reached(Exception):
        pass

    def reached_training(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(job, "load_data", reached_training)
    with pytest.raises(Reached):
        job.run(_config(tmp_path, runtime, "trainer.resume=true", f"trainer.resume_from={checkpoint}"))


def test_a_failed_sweep_job_does_not_leave_the_parent_run_running(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    config = OmegaConf.create(
        {"name": "sweep", "tracking": {"uri": uri, "experiment_name": "edges"}, "hydra": {"overrides": {"task": ["model=a,b"]}}}
    )
    monkeypatch.setenv(PARENT_RUN_ENV, "unset at the end")  # restored to what it was before the test, whatever happens
    monkeypatch.delenv(PARENT_RUN_ENV)
    callback = MultirunParentRun()
    callback.on_multirun_start(config)
    parent = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("edges").experiment_id])[0].info.run_id
    # Hydra's sweeper re-raises a failed job's error after on_job_end, so on_multirun_end never comes
    callback.on_job_end(config, job_return=JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("out of memory")))
    assert MlflowClient(uri).get_run(parent).info.status == "FAILED"
    assert PARENT_RUN_ENV not in os.environ  # a run started later in this process is no child of the failed sweep


def _sweep(tmp_path, monkeypatch) -> tuple[MultirunParentRun, DictConfig, str]:
    """A multirun's callback, started: (it, a job's config, the parent run's id)."""
    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    config = OmegaConf.create(
        {"name": "sweep", "tracking": {"uri": uri, "experiment_name": "edges"}, "hydra": {"overrides": {"task": ["model=a,b"]}}}
    )
    monkeypatch.setenv(PARENT_RUN_ENV, "unset at the end")  # restored to what it was before the test, whatever happens
    monkeypatch.delenv(PARENT_RUN_ENV)
    monkeypatch.setattr("atexit.register", lambda *args: None)  # the pytest process's exit is no sweep's
    callback = MultirunParentRun()
    callback.on_multirun_start(config)
    return callback, config, os.environ[PARENT_RUN_ENV]


def _job(config: DictConfig, num: int) -> DictConfig:
    return OmegaConf.merge(config, {"hydra": {"job": {"num": num}}})


def test_the_jobs_after_a_failed_one_stay_children_of_the_failed_sweep(tmp_path, monkeypatch):
    """Hydra's basic launcher runs every job of its batch before the sweeper raises the failed one's error."""
    callback, config, parent = _sweep(tmp_path, monkeypatch)
    client = MlflowClient(config.tracking.uri)
    for num, status in ((0, JobStatus.FAILED), (1, JobStatus.COMPLETED)):
        callback.on_job_start(_job(config, num))
        assert os.environ.get(PARENT_RUN_ENV) == parent  # the job's run is filed as the sweep's child
        callback.on_job_end(_job(config, num), job_return=JobReturn(status=status, _return_value=None))
    run = client.get_run(parent)
    assert (run.info.status, run.data.tags["sweep.failed_jobs"]) == ("FAILED", "0")
    assert PARENT_RUN_ENV not in os.environ  # nor is a run started later in this process


def test_an_interrupted_sweep_is_closed_killed_at_exit(tmp_path, monkeypatch):
    """Ctrl-C in a job skips Hydra's end callbacks: without this the parent would stay RUNNING."""
    callback, config, parent = _sweep(tmp_path, monkeypatch)
    callback.on_job_start(_job(config, 0))
    callback._close_interrupted()  # what atexit runs
    assert MlflowClient(config.tracking.uri).get_run(parent).info.status == "KILLED"
    assert PARENT_RUN_ENV not in os.environ


def test_resuming_a_last_pt_copied_out_of_a_finished_run_is_refused_and_the_run_stays_finished(tmp_path, monkeypatch):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.experiment_id(uri, "edges")).info.run_id
    client.set_terminated(run_id, "FINISHED")
    copied = _resumable(tmp_path / "elsewhere" / "last.pt", config=to_plain_dict(_config(tmp_path)), mlflow_run_id=run_id)
    monkeypatch.setattr(job, "load_data", lambda *args: pytest.fail("the finished run was reopened to train more epochs"))
    with pytest.raises(ConfigError, match=f"MLflow run {run_id} finished") as refused:
        job.run(_config(tmp_path, "trainer.resume=true", f"trainer.resume_from={copied}"))
    assert refused.value.where == str(copied) and "without trainer.resume" in refused.value.hint
    assert client.get_run(run_id).info.status == "FINISHED"
