"""K-fold cross-validation of one training config: the selection score that never looks at test.

`cross_validate(overrides, out_dir)` trains the config once per fold (`data.cv_folds`/`data.cv_fold`:
train + validation pooled, de-duplicated groups kept together, test left out, see
medtriage.data.folds), each fold a child MLflow run of one "trial" run, and scores each fold's
held-out images with the run's final weights. The trial's score is the mean held-out log-loss after a
temperature fitted on other held-out cases (every package is served temperature-scaled, so only what survives
the temperature counts), a proper score: it still separates configs when every fold's AUC is near 1. Folds run as
`scripts/train.py` processes (export off), `jobs` at a time, so a 2-core machine trains two folds
on one thread each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from medtriage.config import check_values, compose_train_config
from medtriage.data.audit import require_clean
from medtriage.data.folds import cross_validation_fold
from medtriage.data.holdout import hold_out_site
from medtriage.data.manifest import Manifest
from medtriage.data.sources.registry import build_pool
from medtriage.errors import ConfigError, MedTriageError
from medtriage.signals import signals_held, terminate_as_interrupt
from medtriage.training.refused_runs import training_started
from medtriage.training.report import METRICS_FILE
from medtriage.training.resume import clear_earlier_run
from medtriage.training.tracking import PARENT_RUN_ENV, PARENT_TAG, experiment_id

SCORES = ("calibrated_log_loss", "log_loss", "brier", "auc", "acc")  # read from each fold's `val/<score>`; the first one selects
STOP_WAIT_S = 60  # for a stopped fold to end its MLflow run, before it is killed
OWN_KEYS = ("cv.", "data.cv_", "export.enabled", "paths.output_dir", "hydra.", "hparams_search", "tracking.run_name")


class FoldFailedError(MedTriageError):
    """A fold's training process failed; the trial has no score."""


@dataclass
class Fold:
    fold: int
    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass
class CrossValidation:
    overrides: list[str]
    folds: list[Fold]
    run_id: str  # the trial's MLflow run; the folds are its children

    def values(self, score: str) -> np.ndarray:
        missing = [f for f in self.folds if f"val/{score}" not in f.metrics]
        if missing:
            raise MedTriageError(
                f"folds {[f.fold for f in missing]} have no held-out {score}",
                where=", ".join(str(f.output_dir / METRICS_FILE) for f in missing),
                hint="each fold needs held-out images of both classes, at least 2 of each for the score after temperature: "
                "use fewer folds or more data",
            )
        return np.array([f.metrics[f"val/{score}"] for f in self.folds])

    def mean(self, score: str = SCORES[0]) -> float:
        return float(self.values(score).mean())

    def sd(self, score: str = SCORES[0]) -> float:
        values = self.values(score)
        return float(values.std(ddof=1)) if len(values) > 1 else 0.0

    def reported(self) -> tuple[str, ...]:
        """The scores to report: the selection score (a fold without it raises), and each other score every fold holds
        (a task of more than two classes has no Brier score, a held-out fold of one class no AUC)."""
        self.values(SCORES[0])
        return tuple(s for s in SCORES if all(f"val/{s}" in f.metrics for f in self.folds))

    @property
    def score(self) -> float:
        """Mean held-out log-loss after temperature scaling: lower is better."""
        return self.mean(SCORES[0])


def quoted(value: str) -> str:
    """`value` as a quoted Hydra override value (paths may hold `=` and `,`: a sweep's job folders do)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_fold_settings(cfg: DictConfig) -> None:
    """Refuse settings that every fold run would fail on or misuse, but only after the pool is built or its training done."""
    trainer, found = cfg.trainer, []
    if trainer.stop_after_epochs and trainer.stop_after_epochs < trainer.max_epochs:
        found.append(f"trainer.stop_after_epochs={trainer.stop_after_epochs} (a fold stopped early ends without a held-out score)")
    if trainer.resume or trainer.resume_from:
        found.append("trainer.resume/trainer.resume_from (every fold would continue the same earlier run)")
    if cfg.data.get("refit"):
        found.append("data.refit=true (a refit holds no fold out: run it after the cross-validation)")
    if found:
        raise ConfigError(
            "cross-validation cannot train its folds with " + "; ".join(found),
            where="config",
            hint="drop these settings from the command line or the experiment file",
        )


def fold_command(overrides: Sequence[str], folds: int, fold: int, output_dir: Path, run_name: str) -> list[str]:
    """A `scripts/train.py` process that trains fold `fold` and exports nothing."""
    return [
        sys.executable,
        "-m",
        "medtriage.cli.train",
        *overrides,
        f"data.cv_folds={folds}",
        f"data.cv_fold={fold}",
        "export.enabled=false",
        f"tracking.run_name={run_name}",
        "hydra.run.dir=" + quoted(str(output_dir)),
    ]


def cross_validate(overrides: Sequence[str], out_dir: Path, cfg: DictConfig | None = None) -> CrossValidation:
    """Train the config of `overrides` on every fold, `cv.jobs` processes at a time; the folds' held-out scores.

    `cfg` is that config when the caller has it composed already (inside a Hydra app, which cannot compose again).
    """
    cfg = cfg if cfg is not None else compose_train_config([*overrides, "paths.output_dir=."])
    check_values(cfg)  # here, not in each fold's log after the pool is built
    check_fold_settings(cfg)
    overrides = [o for o in overrides if not o.lstrip("+~").startswith(OWN_KEYS)]  # what the fold runs share
    folds, jobs = cfg.cv.folds, cfg.cv.jobs
    for fold in range(folds):  # here, not in each fold's log once the others train
        clear_earlier_run(fold_dir(Path(out_dir), fold) / "checkpoints")
    with terminate_as_interrupt():  # all that can refuse the folds, before the MLflow run: a refusal leaves none
        manifest = build_pool(cfg.data)  # here, once: folds starting side by side would wait for one another to build it
        check_folds_cut(manifest, cfg)
    client = MlflowClient(cfg.tracking.uri)
    parent = os.environ.get(PARENT_RUN_ENV)
    trial = client.create_run(
        experiment_id(cfg.tracking.uri, cfg.tracking.experiment_name),
        run_name=f"{cfg.name}-cv{folds}",
        tags={"cross_validation": "true", **({PARENT_TAG: parent} if parent else {})},
    )
    training_started()  # the MLflow run names the run folder (its fold<k>/ children): it is kept, however the run ends
    run_id = trial.info.run_id
    client.log_param(run_id, "cv.overrides", " ".join(overrides) or "-")
    client.log_param(run_id, "cv.folds", folds)
    print(f"cross-validation of `{' '.join(overrides)}` on {folds} folds; MLflow run {run_id}", flush=True)
    try:
        with terminate_as_interrupt():
            result = CrossValidation(list(overrides), _run_folds(overrides, folds, Path(out_dir), jobs, cfg.name, run_id), run_id)
        for score in result.reported():
            for fold, value in zip(result.folds, result.values(score), strict=True):
                client.log_metric(run_id, f"cv/{score}", float(value), step=fold.fold)
            client.log_metric(run_id, f"cv/mean_{score}", result.mean(score))
            client.log_metric(run_id, f"cv/sd_{score}", result.sd(score))
    except KeyboardInterrupt:
        with signals_held():
            client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        with signals_held():
            client.set_terminated(run_id, "FAILED")
        raise
    with signals_held():
        client.set_terminated(run_id, "FINISHED")
    print(
        "cross-validation: "
        + ", ".join(f"{s} {result.mean(s):.4f} ± {result.sd(s):.4f}" for s in result.reported())
        + f" (MLflow run {run_id})\n"
        f"fold models in {out_dir}; to serve them as one ensemble calibrated on their out-of-fold predictions: "
        f"python scripts/export_ensemble.py --name <package name> --cross-validation {out_dir}",
        flush=True,
    )
    return result


def check_folds_cut(manifest: Manifest, cfg: DictConfig) -> None:
    """Cut and audit every fold, as its run will, before any trains: a fold that cannot be cut (more folds than a class
    has patients, a test image duplicated in a fold) or fails its leakage audit (a site without positive images in
    it) would otherwise fail only once the folds before it have trained. The audit reads the table alone: the cut has
    read every image already (refusing pixels that are not finite), and keeps duplicates in one fold, so the fold's
    image checks find no duplicate across its train and validation images."""
    data = cfg.data
    if data.holdout_site:
        manifest = hold_out_site(manifest, data.holdout_site, validated=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scikit-learn's on a small class: each fold's log keeps it
        for fold in range(cfg.cv.folds):
            cut = cross_validation_fold(manifest, cfg.cv.folds, fold, data.cv_seed, allow_duplicates=data.allow_audit_failure)
            require_clean(cut, override=data.allow_audit_failure, check_images=False)


def _finished(running: list[tuple[Fold, subprocess.Popen, float]], folds: int) -> list[Fold]:
    """The folds whose process ended (taken out of `running`), with their metrics; a failed one raises."""
    finished = []
    for item in [r for r in running if r[1].poll() is not None]:
        running.remove(item)
        fold, process, started = item
        fold.wall_s = time.perf_counter() - started
        if process.returncode != 0:
            raise FoldFailedError(
                f"fold {fold.fold} failed (exit {process.returncode}){_error_line(fold.output_dir / 'train.log')}",
                where=str(fold.output_dir / "train.log"),
                hint="read the fold's log; the other folds were stopped",
            )
        metrics_file = fold.output_dir / METRICS_FILE
        if not metrics_file.is_file():  # exit 0 without it: the run was stopped before its end
            raise FoldFailedError(
                f"fold {fold.fold} ended without its held-out scores ({METRICS_FILE})",
                where=str(fold.output_dir / "train.log"),
                hint="read the fold's log; the other folds were stopped",
            )
        fold.metrics = json.loads(metrics_file.read_text())
        finished.append(fold)
        print(
            f"  fold {fold.fold + 1}/{folds} done in {fold.wall_s / 60:.1f} min: val log-loss {fold.metrics['val/log_loss']:.4f}",
            flush=True,
        )
    return finished


def _error_line(log: Path) -> str:
    """`: <message>` of the last `error:` line of a fold's log (a fold run ends so on a MedTriageError), else nothing:
    the reason belongs in the cross-validation's own message, not only in one of its folds' logs."""
    try:
        errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    except OSError:
        return ""
    return f": {errors[-1].removeprefix('error: ')}" if errors else ""


def _stop(running: list[tuple[Fold, subprocess.Popen, float]]) -> None:
    for _, process, _ in running:
        process.terminate()  # each ends its MLflow run KILLED (medtriage.signals.terminate_as_interrupt)
    for _, process, _ in running:
        try:
            process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()


def fold_dir(out_dir: Path, fold: int) -> Path:
    """The run folder of fold `fold` of the cross-validation in `out_dir`."""
    return out_dir / f"fold{fold}"


def _run_folds(overrides: list[str], folds: int, out_dir: Path, jobs: int, name: str, trial_run_id: str) -> list[Fold]:
    env = {**os.environ, PARENT_RUN_ENV: trial_run_id}
    pending = [Fold(i, fold_dir(out_dir, i)) for i in range(folds)]
    running: list[tuple[Fold, subprocess.Popen, float]] = []
    done: list[Fold] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                fold = pending.pop(0)
                fold.output_dir.mkdir(parents=True, exist_ok=True)
                (fold.output_dir / METRICS_FILE).unlink(missing_ok=True)  # an earlier run's in a reused folder is not this fold's
                command = fold_command(overrides, folds, fold.fold, fold.output_dir, f"{name}-cv{folds}-fold{fold.fold}")
                with (fold.output_dir / "train.log").open("w") as log:  # the process keeps its own copy of the handle
                    running.append((fold, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), time.perf_counter()))
                print(f"  fold {fold.fold + 1}/{folds} started (log: {fold.output_dir / 'train.log'})", flush=True)
            time.sleep(1.0)
            done += _finished(running, folds)
    except BaseException:  # a failed fold, Ctrl-C, or SIGTERM (which reaches this process alone): no fold trains on
        _stop(running)
        raise
    return sorted(done, key=lambda f: f.fold)
