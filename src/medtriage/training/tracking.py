"""MLflow tracking: where runs go, what each run records, and parent/child runs for Hydra multiruns.

A run records its flattened resolved config (params), the resolved YAML (artifact), the git
commit and the data fingerprint (tags and params), so the run alone says how to repeat it.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from medtriage.errors import ConfigError, MedTriageError
from medtriage.project import git_commit
from medtriage.signals import signals_held

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks
    fcntl = None

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MEDTRIAGE_PARENT_RUN_ID"
PARENT_TAG = "mlflow.parentRunId"


def artifact_location(uri: str) -> str | None:
    """Next to an embedded SQLite store: `<db folder>/mlruns` (absolute, independent of cwd)."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None  # a tracking server decides where artifacts live
    db_path = Path(uri[len("sqlite:///") :])
    return (db_path.parent / "mlruns").resolve().as_uri()


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Held while a process opens the store and finds or creates an experiment. MLflow creates a new SQLite store's
    tables, and an experiment, by check-then-act: runs that start together on a new store (a sweep's jobs, the folds of
    a cross-validation, two terminals) would otherwise each try, and all but one fail."""
    if urlparse(uri).scheme != "sqlite" or fcntl is None:
        yield  # a tracking server keeps its own store; without fcntl (Windows), start the first run alone
        return
    db_path = Path(uri[len("sqlite:///") :])
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with open(db_path.with_name(db_path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def experiment_id(uri: str, name: str) -> str:
    """The experiment `name` in the store at `uri`, created (with the store itself) when it is not there yet."""
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return _active(found, uri)
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location(uri))
        except MlflowException as error:  # another client of the same tracking server created it first
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            return _active(mlflow.get_experiment_by_name(name), uri)


def _active(experiment, uri: str) -> str:
    """The id of `experiment`, when it is not deleted: a deleted one keeps its name, so no new experiment can take it,
    and MLflow refuses a run in it."""
    if experiment.lifecycle_stage != "deleted":
        return experiment.experiment_id
    raise ConfigError(
        f"the MLflow experiment {experiment.name!r} in the tracking store {uri} is deleted",
        where="tracking.experiment_name",
        hint=f"restore it (`mlflow experiments restore --experiment-id {experiment.experiment_id}` with "
        f"MLFLOW_TRACKING_URI={uri}), remove it for good with `mlflow gc --backend-store-uri {uri} --experiment-ids "
        f"{experiment.experiment_id}`, or set another tracking.experiment_name",
    )


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"trainer.lr": "0.001", ...} (lists kept whole, as text)."""
    if isinstance(tree, dict):
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: str(tree)}


def check_destination(cfg: DictConfig, resume_run_id: str | None = None, checkpoint: Path | None = None) -> None:
    """Fail before any data work when the run could not be recorded: the experiment is deleted, or the resumed run (of
    `checkpoint`) is not in the store or finished (start_run would find either only after the pool is built and
    audited)."""
    uri = cfg.tracking.uri
    if resume_run_id:
        _resumable(uri, resume_run_id, checkpoint)
    elif not os.environ.get(PARENT_RUN_ENV):
        mlflow.set_tracking_uri(uri)
        found = mlflow.get_experiment_by_name(cfg.tracking.experiment_name)  # not created yet: the run may still fail
        if found is not None:
            _active(found, uri)


def start_run(cfg: DictConfig, resume_run_id: str | None = None):
    """An active MLflow run: the interrupted one when resuming, else a new one (child of a sweep's parent)."""
    uri = cfg.tracking.uri
    mlflow.set_tracking_uri(uri)
    if resume_run_id:
        _resumed_runs.add(resume_run_id)
        return mlflow.start_run(run_id=_resumable(uri, resume_run_id))
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        exp_id = MlflowClient(uri).get_run(parent).info.experiment_id
    else:
        exp_id = experiment_id(uri, cfg.tracking.experiment_name)
    tags = {PARENT_TAG: parent} if parent else {}
    return mlflow.start_run(experiment_id=exp_id, run_name=cfg.tracking.run_name or _run_name(cfg), tags=tags)


def _resumable(uri: str, run_id: str, checkpoint: Path | None = None) -> str:
    """`run_id`, when the store at `uri` holds it undeleted and unfinished: a resume against another store
    (MLFLOW_TRACKING_URI unset in a new shell, a laptop's SQLite file instead of the server) fails here, saying which
    run and which store; so does a last.pt copied out of a finished run's folder (the folder's metrics.json, which
    marks it finished, stayed behind), which would set the finished run RUNNING again and log more epochs into it."""
    info = _run_info(uri, run_id)
    if info is None:
        raise ConfigError(
            f"the checkpoint's MLflow run {run_id} is not in the tracking store {uri}",
            where="tracking.uri",
            hint="resume with the store the run started in (MLFLOW_TRACKING_URI), or start a new run without trainer.resume",
        )
    if info.status == "FINISHED":
        raise ConfigError(
            f"the checkpoint's MLflow run {run_id} finished: a finished run is never resumed",
            where=checkpoint or "trainer.resume_from",
            hint="resume an interrupted run's last.pt instead, or start a new run without trainer.resume and "
            "trainer.resume_from (it starts from new weights)",
        )
    return run_id


def _run_info(uri: str, run_id: str):
    """The info of `run_id` in the store at `uri`, or None when the store does not hold it or holds it deleted."""
    try:
        info = MlflowClient(uri).get_run(run_id).info
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return None
    return None if info.lifecycle_stage == "deleted" else info


def finished(uri: str, run_id: str | None) -> bool:
    """Whether the store at `uri` holds `run_id` finished (one it does not hold is `_resumable`'s to refuse)."""
    info = _run_info(uri, run_id) if run_id else None
    return info is not None and info.status == "FINISHED"


def end_run(status: str) -> None:
    """mlflow.end_run, whole whatever signal comes meanwhile (`signals_held`)."""
    with signals_held():
        mlflow.end_run(status)


def end_stopped_run(status: str) -> None:
    """`end_run` of a run that failed or was interrupted. A store that cannot take the status (locked, full, down: often
    what stopped the run) gets a warning: its error must not replace the one, or the Ctrl-C, that stopped the run."""
    active = mlflow.active_run()
    try:
        end_run(status)
    except Exception as err:  # noqa: BLE001 -- any store's failure; a Ctrl-C meanwhile still goes on
        run_id = active.info.run_id if active else "?"
        log.warning(
            "could not mark MLflow run %s %s (%s): it may read RUNNING; trainer.resume=true continues it", run_id, status, _first_line(err)
        )


class TrackingError(MedTriageError):
    """The MLflow store could not record the run: locked by another process, full, unwritable, or a server down."""


def unrecorded(err: MlflowException, uri: str) -> TrackingError:
    """`err` of the store at `uri` as one line: MLflow's own message carries the SQL statement and a traceback."""
    return TrackingError(
        f"the MLflow store {uri} could not record the run ({_first_line(err)})",
        where="tracking.uri",
        hint="the checkpoints written so far are kept: once the store answers again (another process holding its SQLite "
        "file locked, a full disk, a tracking server down), continue the run with trainer.resume=true, "
        "or start it again if it stopped before its first epoch ended",
    )


def end_finished_run(uri: str, marker: Path, then: str = "") -> None:
    """`end_run("FINISHED")` once `marker` (metrics.json) is written. The run is finished on disk then and every resume
    passes its folder over, so a store that cannot take the status is told with the command that records it, not a
    resume (and `then`: what the run's command would have done next)."""
    run_id = mlflow.active_run().info.run_id
    try:
        end_run("FINISHED")
    except MlflowException as err:
        raise TrackingError(
            f"the MLflow store {uri} could not mark the finished run {run_id} FINISHED ({_first_line(err)})",
            where="tracking.uri",
            hint=f"the run is complete: its checkpoints and {marker} are written and its MLflow run holds its metrics; "
            "only its status is wrong (RUNNING), and a resume never continues a finished run. Once the store answers, "
            f"mark it: {mark_finished_command(uri, run_id)}{then}",
        ) from err


def mark_finished_command(uri: str, run_id: str) -> str:
    """The command that records `run_id` FINISHED in the store at `uri`, as `end_run` would have."""
    return f"python -c \"import mlflow; mlflow.MlflowClient({uri!r}).set_terminated({run_id!r}, 'FINISHED')\""


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _run_name(cfg: DictConfig) -> str:
    return f"{cfg.name}-{cfg.model.name}-{cfg.model.preprocess.size}px"


def log_run_config(cfg: DictConfig, plain: dict, fingerprint: str, data_summary: dict[str, Any]) -> None:
    """Params, resolved YAML, git commit and data fingerprint of a new run."""
    commit, dirty = git_commit(plain["paths"]["root"])
    params = flatten(plain)
    params.update({"data.fingerprint": fingerprint, **{f"data.{k}": str(v) for k, v in data_summary.items()}})
    mlflow.log_params(params)
    mlflow.set_tags(
        {
            "git_commit": commit,
            "git_dirty": str(dirty),
            "data_fingerprint": fingerprint,
            "mlflow.source.git.commit": commit,
            "experiment": cfg.name,
            "model": cfg.model.name,
        }
    )
    mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(plain)), "config/resolved.yaml")


def log_resumed_config(saved: dict, plain: dict, epoch: int) -> None:
    """What the process resuming the active run after `epoch` changed of the config the epochs before ran with (what a
    resume may change, its own Hydra folder) and of the run's git commit. Params keep the first process's values (MLflow
    refuses to change them): without this, epochs trained on another precision, device or code read as trained alike."""
    before, now = flatten(saved), flatten(plain)
    changed = [
        f"{key}: {before.get(key, '(absent)')} -> {now.get(key, '(absent)')}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    first_commit = mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("git_commit")
    commit, dirty = git_commit(plain["paths"]["root"])
    if first_commit and commit != first_commit:
        changed.append(f"git_commit: {first_commit} -> {commit}{' (dirty)' if dirty else ''}")
    mlflow.set_tags({"resumed_from_epoch": str(epoch), f"resumed_at_epoch_{epoch}": _tag_text("; ".join(changed) or "nothing changed")})
    mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(plain)), f"config/resumed_at_epoch_{epoch}.yaml")


def _tag_text(text: str, limit: int = 5000) -> str:
    """A tag value MLflow stores whatever its version (the whole list is in the YAML logged beside it)."""
    return text if len(text) <= limit else text[: limit - 40] + " ... (cut; see the resumed config's YAML)"


# Runs continued in this process: their steps may have been logged before the interruption.
_resumed_runs: set[str] = set()


def log_metrics(metrics: dict[str, float], step: int) -> None:
    """`metrics` at `step` in the active run, unless a resumed run logged that step already."""
    # MLflow metric keys allow letters, digits, "_-./ " only; site names are kept to those.
    safe = {safe_key(k): float(v) for k, v in metrics.items()}
    if safe and not _logged_before(safe, step):
        mlflow.log_metrics(safe, step=step)


def _logged_before(metrics: dict[str, float], step: int) -> bool:
    """True when the active run was resumed and holds `step` already. A run stopped after logging an epoch but before
    checkpointing it trains that epoch again on resume: logged twice, the charts would show two points at one step.
    One key stands for the batch: a batch is logged in one call, whole or not at all."""
    active = mlflow.active_run()
    run_id = active.info.run_id if active else None
    if run_id not in _resumed_runs:
        return False
    history = MlflowClient().get_metric_history(run_id, next(iter(metrics)))
    return any(point.step == step for point in history)


def safe_key(key: str) -> str:
    """`key` in the characters MLflow allows in a metric's name (a site's name may hold others)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class MultirunParentRun(Callback):
    """Hydra callback: a multirun opens one parent MLflow run; each job's run becomes its child."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not sweep_folder_writable(config):
            return  # no parent for a sweep that cannot start: Hydra's sweeper fails next, one line (cli.hydra_command)
        uri, name = config.tracking.uri, config.tracking.experiment_name
        client = MlflowClient(uri)
        run = client.create_run(experiment_id(uri, name), run_name=f"{config.name}-sweep", tags={"sweep": "true"})
        client.log_param(run.info.run_id, "sweep.overrides", " ".join(config.hydra.overrides.task) or "-")
        os.environ[PARENT_RUN_ENV] = self._parent = run.info.run_id
        self._uri, self._failed = uri, []
        # Ctrl-C in a job skips Hydra's end callbacks (it catches Exception only): the parent is closed at exit
        atexit.register(self._close_interrupted)
        print(f"MLflow parent run {run.info.run_id} (children: one per job); open with `{ui_command(uri)}`")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        parent = getattr(self, "_parent", None)
        if parent is not None:  # forgotten after a failed job (on_job_end): the jobs after it are the sweep's still
            os.environ[PARENT_RUN_ENV] = parent

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Hydra's launcher runs the batch's other jobs, then its sweeper re-raises a failed job's error, so
        # on_multirun_end never comes: the parent is closed here, naming the failed jobs; and forgotten after each job
        # from then on, or runs started later in this process would be filed as its children.
        parent = getattr(self, "_parent", None)
        if parent is None:
            return
        if job_return.status == JobStatus.FAILED:
            self._failed.append(str(OmegaConf.select(config, "hydra.job.num", default="?")))
            client = MlflowClient(config.tracking.uri)
            client.set_tag(parent, "sweep.failed_jobs", ",".join(self._failed))
            client.set_terminated(parent, "FAILED")
        if self._failed and os.environ.get(PARENT_RUN_ENV) == parent:
            del os.environ[PARENT_RUN_ENV]

    def _close_interrupted(self) -> None:
        """At exit: a parent neither ended nor failed was interrupted (Ctrl-C, SIGTERM in a job): KILLED, as its job."""
        if self._failed or os.environ.get(PARENT_RUN_ENV) != self._parent:
            return
        del os.environ[PARENT_RUN_ENV]
        try:
            MlflowClient(self._uri).set_terminated(self._parent, "KILLED")
        except Exception:  # noqa: BLE001 -- at exit, the store may be gone (a temporary one): nothing left to close
            log.warning("could not close the sweep's MLflow run %s: it may show RUNNING", self._parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.pop(PARENT_RUN_ENV, None)
        if parent is None:
            return
        client = MlflowClient(config.tracking.uri)
        children = client.search_runs([client.get_run(parent).info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
        best = [c.data.metrics["best_val_auc"] for c in children if "best_val_auc" in c.data.metrics]
        if best:
            client.log_metric(parent, "best_val_auc", max(best))
        client.log_metric(parent, "jobs", len(children))
        client.set_terminated(parent, "FINISHED")


def sweep_folder_writable(config: DictConfig) -> bool:
    """Whether the sweep's folder (hydra.sweep.dir) is made, or there, and writable. Checked before the parent run is
    opened: Hydra makes the folder only after `on_multirun_start`, and a parent opened for a sweep whose folder cannot
    be made (the runs folder a file, or not writable) would stay RUNNING, then KILLED, with no job and no folder. A
    callback's exception is only a warning to Hydra: the sweeper's own attempt is what ends the command."""
    folder = OmegaConf.select(config, "hydra.sweep.dir", default=None)
    if folder is None:  # a config composed without Hydra's node: nothing to check
        return True
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)
