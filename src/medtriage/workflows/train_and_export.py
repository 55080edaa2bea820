"""The job behind `python scripts/train.py`: train one model, then export its best checkpoint as a package."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from medtriage import training
from medtriage.errors import ConfigError, MedTriageError
from medtriage.export.registry import log_checkpoint_command
from medtriage.export.run import check_export_settings, export_run
from medtriage.signals import terminate_as_interrupt
from medtriage.training.job import RunResult
from medtriage.training.report import run_folder


def train_and_export(cfg: DictConfig) -> RunResult:
    """Train as `cfg` says; when `export.enabled` and the run finished, export it and log the package to the run."""
    check_refit_unscored(cfg)
    checked = None
    if cfg.export.enabled and not cfg.data.get("refit"):
        checked = check_export_settings(cfg.export)  # now, not after the training it would waste
    result = training.run(cfg)
    if cfg.data.get("refit") and result.finished:
        print(
            "a refit has no validation split to calibrate on: serve it calibrated on the out-of-fold scores of the "
            "recipe's cross-validation, python scripts/export_ensemble.py --name <package name> "
            f"--cross-validation <the folder of scripts/cross_validate.py> --refit {run_folder(result.output_dir)} [more refit runs]"
        )
    elif cfg.export.enabled and result.finished:
        result.package = _export_trained(result, cfg, checked)
        print(f"model package: {result.package}")
    return result


def check_refit_unscored(cfg: DictConfig) -> None:
    """Refuse a refit (`data.refit`) that a sweeper would optimise (hydra.sweeper.direction set, as Optuna's is): it has
    no validation split, so what scripts/train.py returns it, the best validation AUC, is -inf for every trial and the
    search would pick among them at random. A refit under the basic sweeper (`-m trainer.seed=0,1,2`) is scored by
    nothing and trains."""
    if not cfg.data.get("refit") or not HydraConfig.initialized() or HydraConfig.get().sweeper.get("direction") is None:
        return
    raise ConfigError(
        "a refit has no validation split to score, so a sweeper would optimise -inf: every trial alike",
        where="data.refit",
        hint="search the recipe with python scripts/cross_validate.py -m hparams_search=<search> (it scores each trial "
        "on held-out folds), then refit the chosen config without the sweeper: python scripts/train.py data.refit=true "
        "[-m trainer.seed=0,1,2 for several refits]",
    )


def _export_trained(result: RunResult, cfg: DictConfig, checked) -> Path:
    """export_run for the run just trained; a failed or stopped export says that the training is kept and how to export
    it alone (the error alone would read as if the hours of training were lost, and a resume finds nothing to resume)."""
    try:
        with terminate_as_interrupt():  # SIGTERM and SIGHUP as Ctrl-C: the export withdraws what it registered
            return export_run(run_id=result.run_id, checkpoint=result.checkpoint, cfg=cfg, checked=checked)
    except KeyboardInterrupt:
        print(f"the export after training was stopped: {_retry(result, cfg, 'export it on its own')}", file=sys.stderr, flush=True)
        raise
    except MedTriageError as err:
        hint = f"{err.hint}; " if err.hint else ""
        raise type(err)(f"the export after training failed: {err.reason}", where=err.where, hint=hint + _retry(result, cfg)) from err
    except Exception as err:
        err.add_note(f"the export after training failed ({_retry(result, cfg)})")
        raise


def _retry(result: RunResult, cfg: DictConfig, then: str = "fix the cause, then export it again on its own") -> str:
    """What is kept of a run whose export failed, and the command that exports it again without training."""
    command = f"python scripts/export.py run_id={result.run_id} [export.key=value ...]"
    kept = f"the training itself finished and is kept: MLflow run {result.run_id}, checkpoint {result.checkpoint}"
    if not cfg.get("tracking", {}).get("log_checkpoint", True):  # scripts/export.py fetches the checkpoint from the run
        command = (
            f"{log_checkpoint_command(result.run_id, result.checkpoint, mlflow.get_tracking_uri())} "
            f"(tracking.log_checkpoint=false kept it out of the run), then {command}"
        )
    return f"{kept}; {then}: {command}"
