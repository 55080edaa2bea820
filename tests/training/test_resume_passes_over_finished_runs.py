"""Automatic resume passes over a last.pt whose MLflow run finished (copied out of its run folder, whose metrics.json
stayed behind), saying which and why, and continues the newest unfinished run; under torchrun rank 0 alone asks
MLflow, and every rank continues the checkpoint it chose or fails with its refusal."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from medtriage.config import compose_train_config, to_plain_dict
from medtriage.errors import DataNotFoundError, MedTriageError
from medtriage.model.checkpoint import LAST, save_checkpoint
from medtriage.training import job, tracking
from medtriage.training.distributed import SINGLE_PROCESS, Ranks
from medtriage.training.resume import RESUME_KEYS


def _config(tmp_path: Path, runs_dir: str = "runs"):
    return compose_train_config(
        [
            "experiment=pneumoniamnist",
            "model=resnet10",
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.runs_dir={tmp_path / runs_dir}",
            "trainer.resume=true",
        ]
    )


def _run_ended(uri: str, status: str) -> str:
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.experiment_id(uri, "resume")).info.run_id
    client.set_terminated(run_id, status)
    return run_id


def _checkpoint(run_dir: Path, run_id: str, config: dict, age: int) -> Path:
    """A resumable last.pt of the MLflow run `run_id`, written `age` seconds before now."""
    path = save_checkpoint(run_dir / "checkpoints" / LAST, **(dict.fromkeys(RESUME_KEYS, 0) | {"config": config, "mlflow_run_id": run_id}))
    then = path.stat().st_mtime - age
    os.utime(path, (then, then))
    return path


def _runs(tmp_path: Path, uri: str, runs_dir: str, interrupted: bool) -> tuple[Path | None, Path]:
    """Under `runs_dir`: an interrupted run's last.pt when `interrupted`, and a newer copy of a finished run's last.pt."""
    config, experiment = to_plain_dict(_config(tmp_path, runs_dir)), tmp_path / runs_dir / "pneumoniamnist"
    kept = _checkpoint(experiment / "interrupted", _run_ended(uri, "KILLED"), config, age=60) if interrupted else None
    return kept, _checkpoint(experiment / "copied", _run_ended(uri, "FINISHED"), config, age=0)


def test_automatic_resume_passes_over_a_finished_runs_copied_last_pt_and_continues_the_interrupted_run(tmp_path, monkeypatch, caplog):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    interrupted, copied = _runs(tmp_path, uri, "runs", interrupted=True)
    finished_id = torch.load(copied, weights_only=True)["mlflow_run_id"]

    class Reached(Exception):
        pass

    def reached_training(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(job, "load_data", reached_training)
    with caplog.at_level(logging.WARNING, logger="medtriage.training.resume"), pytest.raises(Reached):
        job.run(_config(tmp_path))
    assert any(str(copied) in r.getMessage() and f"MLflow run {finished_id} finished" in r.getMessage() for r in caplog.records)
    cfg = _config(tmp_path)
    assert job.resume_point(cfg, to_plain_dict(cfg), SINGLE_PROCESS)[0] == interrupted
    assert MlflowClient(uri).get_run(finished_id).info.status == "FINISHED"


def test_automatic_resume_with_only_a_finished_runs_copied_last_pt_names_it_among_what_it_passed_over(tmp_path):
    _, copied = _runs(tmp_path, os.environ["MLFLOW_TRACKING_URI"], "runs", interrupted=False)
    cfg = _config(tmp_path)
    with pytest.raises(DataNotFoundError, match="no unfinished run has a checkpoint to resume") as refused:
        job.resume_point(cfg, to_plain_dict(cfg), SINGLE_PROCESS)
    assert str(copied) in refused.value.reason and "finished" in refused.value.reason
    assert "without trainer.resume" in refused.value.hint


def _resume_point_of_rank(rank: int, out: str) -> None:
    if rank:  # a store rank 1 cannot open: asking MLflow there would fail
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/absent/mlflow.db"
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        for runs_dir in ("runs", "copied-only"):
            cfg = _config(Path(out), runs_dir)
            try:
                chosen = str(job.resume_point(cfg, to_plain_dict(cfg), Ranks(rank, 2, rank))[0])
            except MedTriageError as refused:
                chosen = f"{type(refused).__name__}: {refused}"
            Path(out, f"{runs_dir}-rank{rank}.txt").write_text(chosen)
        dist.barrier()  # neither rank closes its connections while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes start and import torch
def test_under_torchrun_every_rank_continues_the_checkpoint_rank_0_chose_or_fails_with_its_refusal(tmp_path):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    interrupted, _ = _runs(tmp_path, uri, "runs", interrupted=True)
    _runs(tmp_path, uri, "copied-only", interrupted=False)
    torch.multiprocessing.spawn(_resume_point_of_rank, args=(str(tmp_path),), nprocs=2)
    chosen = {name: [(tmp_path / f"{name}-rank{r}.txt").read_text() for r in (0, 1)] for name in ("runs", "copied-only")}
    assert chosen["runs"] == [str(interrupted)] * 2
    assert chosen["copied-only"][0] == chosen["copied-only"][1]
    assert chosen["copied-only"][0].startswith("DataNotFoundError: ") and "no unfinished run" in chosen["copied-only"][0]
