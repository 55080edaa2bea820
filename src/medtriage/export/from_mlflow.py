"""Export a finished MLflow run: fetch its best checkpoint, reuse the config inside it, call export_run
(`python scripts/export.py run_id=<id> ...`, medtriage.cli.export)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from omegaconf import OmegaConf

from medtriage.errors import ConfigError, DataNotFoundError
from medtriage.export.registry import find_checkpoint
from medtriage.export.run import export_run
from medtriage.model.checkpoint import read_checkpoint

NOT_FOUND = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}  # unknown, or not an id
UNFINISHED_HINTS = {
    "RUNNING": "wait until its training ends (one whose process died stays RUNNING: resume it with trainer.resume=true)",
    "SCHEDULED": "wait until its training ends",
    "KILLED": "it was stopped: resume it with python scripts/train.py <its overrides> trainer.resume=true, then export",
    "FAILED": "its training failed: see the run's log, resume it with trainer.resume=true or train again",
}


def export_from_mlflow(run_id: str, overrides: list[str] = ()) -> Path:
    """Export run `run_id` with the config its checkpoint carries, plus `key=value` overrides."""
    check_finished_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = find_checkpoint(run_id, Path(tmp))
        config = OmegaConf.create(read_checkpoint(checkpoint)["config"])
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        return export_run(run_id=run_id, checkpoint=checkpoint, cfg=config)


def check_finished_run(run_id: str) -> None:
    """Refuse a run the tracking store does not hold, and one whose training did not finish (its checkpoint would be
    a partly trained or a failed one), before anything is downloaded or registered."""
    uri = mlflow.get_tracking_uri()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        if err.error_code not in NOT_FOUND:
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise DataNotFoundError(
            f"MLflow run {run_id} is not in this tracking store",
            where=uri,
            hint="check the run id (mlflow ui), or set MLFLOW_TRACKING_URI to the store the run was trained in",
        )
    status = run.info.status
    if status != "FINISHED":
        raise ConfigError(
            f"MLflow run {run_id} is {status}, not FINISHED: only a finished training is exported",
            where=uri,
            hint=UNFINISHED_HINTS.get(status, "export a run whose training finished"),
        )
