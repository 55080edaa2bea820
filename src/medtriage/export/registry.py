"""The MLflow side of a model package: its place among a run's artifacts, registered versions, checkpoints to fetch."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

from medtriage.config.schema import ExportConfig
from medtriage.errors import ConfigError, DataNotFoundError, PackageError
from medtriage.project import git_commit

log = logging.getLogger(__name__)
ARTIFACT_DIR = "model_package"  # where the package lives among the MLflow run's artifacts
CHECKPOINT_PREFERENCE = ("best.pt", "last.pt")
REGISTER_ATTEMPTS = 5  # tries at a version number that matches its package folder
# A version is registered before its package is written (the package carries its number): this tag says whether the
# package is at the version's source yet. One left `writing` belongs to an export still running, or to one killed
# before it could withdraw its version: never deploy it.
PACKAGE_STATE_TAG, PACKAGE_WRITING, PACKAGE_LOGGED = "medtriage.package_state", "writing", "logged"


def run_git_commit(run_id: str | None) -> str | None:
    """The commit a run recorded, else the project's current one (None when neither is known)."""
    if run_id:
        commit = mlflow.MlflowClient().get_run(run_id).data.tags.get("mlflow.source.git.commit")
        if commit:
            return commit
    commit, _ = git_commit()
    return None if commit == "unknown" else commit


class Registration:
    """Registers the next model version of `name` (pointing at where the package will be logged, tagged as being
    written) when called, tags it logged once the package is there, and withdraws it again if the package never gets
    there: no version without its package."""

    def __init__(self, run_id: str, name: str):
        self.run_id, self.name, self.version = run_id, name, None

    def __call__(self) -> int:
        client = mlflow.MlflowClient()
        try:
            client.create_registered_model(self.name, description="MedTriage ONNX model package (model.onnx, model.json, MODEL_CARD.md)")
        except MlflowException:
            pass  # already registered: add a version
        expected = max((int(v.version) for v in client.search_model_versions(f"name='{self.name}'")), default=0) + 1
        artifact_uri = client.get_run(self.run_id).info.artifact_uri
        for _ in range(REGISTER_ATTEMPTS):
            source = f"{artifact_uri}/{artifact_path(expected, self.name)}"
            tags = {PACKAGE_STATE_TAG: PACKAGE_WRITING}
            self.version = int(client.create_model_version(self.name, source=source, run_id=self.run_id, tags=tags).version)
            if self.version == expected:
                return self.version
            # Its source names another version's folder: the registry never reuses the number of a deleted version
            # (a withdrawn export; searches do not list those), or another export took `expected`. Try the next one.
            client.delete_model_version(self.name, str(self.version))
            expected, self.version = self.version + 1, None
        raise PackageError(
            f"could not register a version of '{self.name}': other exports kept taking the next number",
            where=f"registered model '{self.name}' in {mlflow.get_tracking_uri()}",
            hint="run the export again once the other exports of this model are done, or export with export.register_model=false",
        )

    def confirm(self) -> None:
        """The package is logged at the version's source."""
        mlflow.MlflowClient().set_model_version_tag(self.name, str(self.version), PACKAGE_STATE_TAG, PACKAGE_LOGGED)

    def withdraw(self) -> None:
        if self.version is not None:
            mlflow.MlflowClient().delete_model_version(self.name, str(self.version))
            log.warning("export failed: registered version %s of '%s' withdrawn", self.version, self.name)
            self.version = None


def registrar(run_id: str | None, cfg: ExportConfig) -> Registration | None:
    """The registration of the next model version, when this export registers one."""
    if not (run_id and cfg.register_model and cfg.log_to_mlflow):
        return None
    return Registration(run_id, cfg.name)


def artifact_path(version: int, name: str) -> str:
    """Each version of each model keeps its own folder among the run's artifacts, so a re-export never overwrites one:
    a run exported under two names gives each its own version 1."""
    return f"{ARTIFACT_DIR}/{name}/v{version}"


def log_package(run_id: str, result) -> None:
    """Log the package (an ExportResult) to its run, versioned, with the export's figures as metrics."""
    client = mlflow.MlflowClient()
    meta = result.meta
    client.log_artifacts(run_id, str(result.package_dir), artifact_path=artifact_path(meta["version"], meta["name"]))
    for key, value in (
        ("export_ece_before", meta["calibration"]["ece_before"]),
        ("export_ece_after", meta["calibration"]["ece_after"]),
        ("export_temperature", meta["calibration"]["temperature"]),
        ("export_parity_max_abs_diff", meta["parity"]["max_abs_diff"]),
        ("export_review_threshold", meta["thresholds"]["review"]["threshold"]),
    ):
        client.log_metric(run_id, key, float(value))
    client.set_tag(run_id, "medtriage.package", f"{meta['name']} v{meta['version']} sha256 {meta['sha256']}")
    print(f"model package {meta['name']} v{meta['version']} -> {result.package_dir} (logged to MLflow run {run_id})")


def log_checkpoint_command(run_id: str, checkpoint: str | Path, uri: str) -> str:
    """The call that adds a checkpoint kept out of its run (tracking.log_checkpoint=false) where find_checkpoint looks,
    in the store `uri` of the run (a client without one would look in MLflow's default, not where the run is)."""
    return f"mlflow.MlflowClient('{uri}').log_artifact('{run_id}', '{checkpoint}', 'checkpoints')"


def find_checkpoint(run_id: str, download_dir: Path) -> Path:
    """Download the best checkpoint artifact (else the last one) of run `run_id`, a finished run of this store."""
    check_finished_run(run_id)
    client = mlflow.MlflowClient()
    paths = _artifact_paths(client, run_id)
    for wanted in CHECKPOINT_PREFERENCE:
        match = [p for p in paths if p.rsplit("/", 1)[-1] == wanted]
        if match:
            return Path(client.download_artifacts(run_id, match[0], str(download_dir)))
    raise DataNotFoundError(
        f"MLflow run {run_id} has no checkpoint artifact ({' or '.join(CHECKPOINT_PREFERENCE)})",
        where=mlflow.get_tracking_uri(),
        hint=f"log its checkpoint to the run: {log_checkpoint_command(run_id, _local_checkpoint(client, run_id), mlflow.get_tracking_uri())}",
    )


def _local_checkpoint(client, run_id: str) -> str:
    """Where the run's training wrote the checkpoint it ends with (its params say: paths.output_dir and
    trainer.weights), when that file is still there; else a placeholder for it."""
    params = client.get_run(run_id).data.params
    name = "last.pt" if params.get("trainer.weights") == "last" else "best.pt"
    local = Path(params.get("paths.output_dir", "")) / "checkpoints" / name
    return str(local) if params.get("paths.output_dir") and local.is_file() else f"<path of its {name}>"


NOT_FOUND = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}  # unknown, or not an id
UNFINISHED_HINTS = {
    "RUNNING": "wait until its training ends (one whose process died stays RUNNING: resume it with trainer.resume=true; "
    "one whose run folder holds metrics.json finished, and only its status was not recorded: mark it FINISHED as the "
    "training's error said)",
    "SCHEDULED": "wait until its training ends",
    "KILLED": "it was stopped: resume it with python scripts/train.py <its overrides> trainer.resume=true, then export",
    "FAILED": "its training failed: see the run's log, resume it with trainer.resume=true or train again",
}


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
            hint="check the run id (mlflow ui), or name the store the run was trained in: tracking.uri=<uri> or MLFLOW_TRACKING_URI",
        )
    status = run.info.status
    if status != "FINISHED":
        raise ConfigError(
            f"MLflow run {run_id} is {status}, not FINISHED: only a finished training is exported",
            where=uri,
            hint=UNFINISHED_HINTS.get(status, "export a run whose training finished"),
        )


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found
