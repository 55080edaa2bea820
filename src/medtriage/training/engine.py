"""The training engine: config -> pooled data -> MONAI network -> epochs -> checkpoints -> MLflow run.

`run(cfg)` is the whole job behind `scripts/train.py`. An epoch = train (tqdm bar with loss and
images/s) -> validate (overall and per site) -> `last.pt`, and `best.pt` when validation AUC
improves. A run interrupted after any epoch continues with `trainer.resume=true`, in the same
MLflow run, from `last.pt`. Under torchrun every rank trains; rank 0 alone tracks and writes.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from medtriage.config import to_plain_dict
from medtriage.data.audit import AuditResult, require_clean
from medtriage.data.datasets import CachedSplit, cache_split, load_pool
from medtriage.data.manifest import SPLITS
from medtriage.data.split_cache import persistent_split
from medtriage.errors import ConfigError
from medtriage.training import distributed, tracking
from medtriage.training.checkpoint import BEST, LAST, find_resume_checkpoint, model_from_config, save_checkpoint
from medtriage.training.distributed import Ranks
from medtriage.training.fit import Fit, TrainState
from medtriage.training.report import final_metrics, log_final, print_summary

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    best_val_auc: float
    checkpoint: Path  # best.pt
    output_dir: Path  # folder of the run's checkpoints
    metrics: dict[str, float] = field(default_factory=dict)  # final val/test metrics, overall and per site
    interrupted: bool = False  # stopped early by trainer.stop_after_epochs; resumable
    package: Path | None = None  # exported model package, when export ran


def pick_device(choice: str) -> torch.device:
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA requested but no CUDA device is visible", where="trainer.device", hint="use trainer=cpu or trainer.device=auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def seed_everything(trainer, device: torch.device) -> None:
    random.seed(trainer.seed)
    np.random.seed(trainer.seed)
    torch.manual_seed(trainer.seed)
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    if device.type == "cuda":  # CPU kernels used here are deterministic already (and the switch costs seconds)
        torch.use_deterministic_algorithms(trainer.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not trainer.deterministic


def selection_score(metrics: dict[str, float]) -> float:
    """Validation AUC; accuracy only when AUC is undefined (a single class in a tiny validation set)."""
    if "val/auc" not in metrics:
        log.warning("validation AUC undefined (one class only): selecting the best epoch by accuracy")
    return metrics.get("val/auc", metrics["val/acc"])


def train_epochs(fit: Fit, state: TrainState, ckpt_dir: Path, config: dict, run_id: str | None) -> bool:
    """Epochs until max_epochs or early stopping; True when stopped by trainer.stop_after_epochs."""
    trainer, done_here = fit.trainer, 0
    while state.epoch < trainer.max_epochs:
        epoch = state.epoch + 1
        metrics = fit.epoch(epoch, state)
        metrics.update(fit.evaluate("val"))
        state.epoch = epoch
        score = selection_score(metrics)
        improved = score > state.best_val_auc
        if improved:
            state.best_val_auc, state.best_epoch, state.epochs_since_best = score, epoch, 0
        else:
            state.epochs_since_best += 1
        if fit.ranks.is_main:
            tracking.log_metrics({**metrics, "best_val_auc": state.best_val_auc}, step=epoch)
            save_checkpoint(ckpt_dir / LAST, **fit.checkpoint(state, config, run_id))
            if improved:
                shutil.copyfile(ckpt_dir / LAST, ckpt_dir / BEST)
            log.info("epoch %d: loss %.4f, val AUC %.4f (best %.4f @ %d), %.0f img/s", epoch, metrics["train/loss"],
                     metrics.get("val/auc", float("nan")), state.best_val_auc, state.best_epoch, metrics["train/images_per_s"])
        done_here += 1
        if trainer.early_stopping_patience and state.epochs_since_best >= trainer.early_stopping_patience:
            log.info("early stopping: no better validation AUC for %d epochs", state.epochs_since_best)
            break
        if trainer.stop_after_epochs and done_here >= trainer.stop_after_epochs and state.epoch < trainer.max_epochs:
            return True
    return False


def load_data(cfg: DictConfig, model, ranks: Ranks) -> tuple[object, dict[str, CachedSplit], AuditResult | None]:
    """The pool, audited for leakage before any training (rank 0 builds and audits, the others wait)."""
    audit = None
    if not ranks.is_main:
        distributed.barrier(ranks)
    manifest = load_pool(cfg.data)
    if ranks.is_main:
        audit = require_clean(manifest, override=cfg.data.allow_audit_failure)
        print(audit.summary())
        splits = resized_splits(cfg, manifest, model)  # rank 0 fills the on-disk cache; the others then read it
        distributed.barrier(ranks)
    else:
        splits = resized_splits(cfg, manifest, model)
    return manifest, splits, audit


def resized_splits(cfg: DictConfig, manifest, model) -> dict[str, CachedSplit]:
    """Every split at the model's input size, from `<pool_dir>/resized` when an earlier run stored it."""
    build = persistent_split if cfg.data.persistent_cache else cache_split
    return {s: build(manifest, s, model.preprocess, cfg.data.limit, cfg.trainer.seed) for s in SPLITS}


def run(cfg: DictConfig) -> "RunResult":
    """Train one model as `cfg` says, tracked in MLflow; returns where everything landed."""
    config = to_plain_dict(cfg)
    ranks, device_choice = distributed.setup(cfg.trainer.device.value)
    try:
        return _run(cfg, config, ranks, pick_device(device_choice))
    finally:
        distributed.teardown(ranks)


def _run(cfg: DictConfig, config: dict, ranks: Ranks, device: torch.device) -> "RunResult":
    seed_everything(cfg.trainer, device)
    model = model_from_config(config)  # an unknown network fails here, before any data work
    resume_path, resumed = find_resume_checkpoint(cfg) if cfg.trainer.resume else (None, None)
    if resumed and resumed["config"]["model"] != config["model"]:
        raise ConfigError("the model config differs from the checkpoint's", where=resume_path, hint="resume with the same model settings")
    manifest, splits, audit = load_data(cfg, model, ranks)
    ckpt_dir = resume_path.parent if resume_path else distributed.broadcast(Path(cfg.paths.output_dir) / "checkpoints", ranks)
    fit = Fit(cfg, model, splits, device, ranks)
    state = fit.restore(resumed) if resumed else TrainState()
    if not ranks.is_main:
        interrupted = train_epochs(fit, state, ckpt_dir, config, None)
        metrics = {} if interrupted else final_metrics(fit, state, ckpt_dir)[0]
        return RunResult("", state.best_val_auc, ckpt_dir / BEST, ckpt_dir, metrics, interrupted)
    run_id = tracking.start_run(cfg, resume_run_id=resumed["mlflow_run_id"] if resumed else None).info.run_id
    try:
        if resumed:
            mlflow.set_tag("resumed_from_epoch", str(state.epoch))
        else:
            sizes = {f"n_{s}": len(splits[s]) for s in SPLITS} | {"sites": ",".join(manifest.sites), "world_size": ranks.world_size}
            tracking.log_run_config(cfg, config, manifest.fingerprint, sizes)
            mlflow.log_dict(audit.to_dict(), "data_audit.json")
            mlflow.set_tag("data_audit", "passed" if audit.ok else "failed, overridden by data.allow_audit_failure")
        print(f"MLflow run {run_id} on {device} x{ranks.world_size}; checkpoints in {ckpt_dir}; "
              f"open with `{tracking.ui_command(cfg.tracking.uri)}`")
        interrupted = train_epochs(fit, state, ckpt_dir, config, run_id)
        if interrupted:
            mlflow.end_run("KILLED")
            print(f"stopped after epoch {state.epoch}; continue with trainer.resume=true (checkpoint {ckpt_dir / LAST})")
            return RunResult(run_id, state.best_val_auc, ckpt_dir / BEST, ckpt_dir, interrupted=True)
        metrics, predictions = final_metrics(fit, state, ckpt_dir)
        log_final(metrics, predictions, state, ckpt_dir, cfg)
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        print(f"interrupted; continue with trainer.resume=true (checkpoints in {ckpt_dir})")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
    result = RunResult(run_id, state.best_val_auc, ckpt_dir / BEST, ckpt_dir, metrics)
    result.package = export_if_enabled(cfg, result)
    print_summary(result, cfg.tracking.uri, manifest.sites)
    return result


def export_if_enabled(cfg: DictConfig, result: RunResult) -> Path | None:
    if not cfg.export.enabled:
        return None
    from medtriage.export import export_run

    return export_run(run_id=result.run_id, checkpoint=result.checkpoint, cfg=cfg)
