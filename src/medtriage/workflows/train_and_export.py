"""The job behind `python scripts/train.py`: train one model, then export its best checkpoint as a package."""

from __future__ import annotations

from omegaconf import DictConfig

from medtriage import training
from medtriage.export.run import check_export_settings, export_run
from medtriage.training.job import RunResult
from medtriage.training.report import run_folder


def train_and_export(cfg: DictConfig) -> RunResult:
    """Train as `cfg` says; when `export.enabled` and the run finished, export it and log the package to the run."""
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
        result.package = export_run(run_id=result.run_id, checkpoint=result.checkpoint, cfg=cfg, checked=checked)
        print(f"model package: {result.package}")
    return result
