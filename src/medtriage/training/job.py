"""One training job: config -> pooled data -> MONAI network -> epochs -> checkpoints -> MLflow run.

`run(cfg)` trains and never exports (medtriage.workflows.train_and_export adds that). An epoch =
train (progress with loss and images/s: a bar on a terminal, plain lines in a log file) -> validate (overall and per
site) -> `last.pt`, and `best.pt` when validation AUC improves. A run interrupted after any epoch continues with
`trainer.resume=true`, in the same MLflow run, from `last.pt`. Under torchrun every rank trains; rank 0 alone tracks
and writes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from medtriage.config import check_values, to_plain_dict
from medtriage.data.audit import AuditResult, require_clean
from medtriage.data.manifest import SPLITS
from medtriage.data.sources.registry import load_pool
from medtriage.data.torch.datasets import CachedSplit, cache_split
from medtriage.data.torch.split_cache import persistent_split
from medtriage.errors import ConfigError
from medtriage.io.safe_output import held_exclusive, remove_partials
from medtriage.model.checkpoint import LAST, final_checkpoint, model_from_config, read_checkpoint
from medtriage.signals import terminate_as_interrupt
from medtriage.training import distributed, tracking
from medtriage.training.distributed import Ranks
from medtriage.training.loop import TrainingLoop, TrainState, train_epochs
from medtriage.training.refused_runs import training_started
from medtriage.training.report import METRICS_FILE, final_metrics, log_final, print_summary, run_folder
from medtriage.training.resume import catch_up_best, clear_earlier_run, find_resume_checkpoint

log = logging.getLogger(__name__)

TRAINING_LOCK = "training.lock"  # in the checkpoint folder, held by the process training the run


@dataclass
class RunResult:
    run_id: str
    best_val_auc: float
    checkpoint: Path  # the final checkpoint (best.pt, or last.pt with trainer.weights=last); interrupted: last.pt
    output_dir: Path  # folder of the run's checkpoints
    metrics: dict[str, float] = field(default_factory=dict)  # final val/test metrics, overall and per site
    interrupted: bool = False  # stopped by trainer.stop_after_epochs: `checkpoint` is what a resume continues, not final
    package: Path | None = None  # exported model package, when a workflow exported it

    @property
    def finished(self) -> bool:
        """A complete run this process tracked (rank 0, not interrupted): what may be exported."""
        return bool(self.run_id) and not self.interrupted


def pick_device(choice: str) -> torch.device:
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "CUDA requested but no CUDA device is visible", where="trainer.device", hint="use trainer=cpu or trainer.device=auto"
        )
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


def run_splits(data) -> tuple[str, ...]:
    """The splits a run loads: all three, train and validation alone in a cross-validation fold (no test), or train
    alone in a refit (`data.refit`)."""
    if data.get("refit"):
        return ("train",)
    return ("train", "val") if data.get("cv_folds") else SPLITS


def check_refit(cfg: DictConfig) -> None:
    """A refit has no validation split: it cannot choose an epoch, stop early, or be a cross-validation fold."""
    if not cfg.data.get("refit"):
        return
    where, conflicts = "data.refit", []
    if cfg.data.get("cv_folds"):
        conflicts.append("data.cv_folds (a refit pools every fold)")
    if getattr(cfg.trainer.weights, "value", cfg.trainer.weights) != "last":
        conflicts.append("trainer.weights=best (no validation AUC to choose an epoch by): set trainer.weights=last")
    if cfg.trainer.early_stopping_patience:
        conflicts.append("trainer.early_stopping_patience (no validation AUC to stop on): set it to null")
    if conflicts:
        raise ConfigError("a refit trains without a validation split, which rules out " + "; ".join(conflicts), where=where)


# How a run is fed and computed, not what it learns: these may change on resume (another machine, more workers).
RUNTIME_KEYS = {
    "data": ("num_workers", "persistent_cache"),
    "trainer": (
        "device",
        "precision",
        "channels_last",
        "loader",
        "num_threads",
        "augment_on",
        "cache_on_device",
        "compile",
        "eval_batch_size",
        "deterministic",
        "resume",
        "resume_from",
        "stop_after_epochs",
    ),
}
RESUME_REASONS = {
    "data": "another pool, split, fold or held-out site would train on images the first epochs held out",
    "trainer": "another schedule, loss or weighting would finish a different recipe than the one the run records",
}


def check_resume_config(saved: dict, config: dict, resume_path: Path) -> None:
    """A resumed run continues the checkpoint's model, on the checkpoint's data, with the checkpoint's recipe (the
    MLflow run it continues records them)."""
    if saved["model"] != config["model"]:
        before, now = tracking.flatten(saved["model"], "model."), tracking.flatten(config["model"], "model.")
        diff = "; ".join(
            f"{key}: {before.get(key, '(absent)')} in the checkpoint, {now.get(key, '(absent)')} now"
            for key in sorted(before.keys() | now.keys())
            if before.get(key) != now.get(key)
        )
        raise ConfigError(
            f"the model config differs from the checkpoint's ({diff})",
            where=resume_path,
            hint="resume with the checkpoint's model settings, or start a new run without trainer.resume",
        )
    for section, reason in RESUME_REASONS.items():
        changed = {
            key: (saved[section][key], value)
            for key, value in config[section].items()
            if key in saved.get(section, {}) and key not in RUNTIME_KEYS[section] and saved[section][key] != value
        }
        if changed:
            diff = "; ".join(f"{section}.{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changed.items())
            raise ConfigError(
                f"the {section} config differs from the checkpoint's ({diff}): {reason}",
                where=resume_path,
                hint=f"resume with the checkpoint's {section} settings, or start a new run without trainer.resume",
            )


def check_resume_world_size(checkpoint: dict, ranks: Ranks, resume_path: Path) -> None:
    """A resumed run trains with as many processes as the checkpoint's run: with another number, each epoch would shard
    the images otherwise, the learning rate would scale to another global batch, and the restored schedule would end
    before (one-cycle: fail at) or after the run's last step."""
    saved = checkpoint.get("world_size")  # absent from checkpoints written before it was recorded
    if saved is None or saved == ranks.world_size:
        return
    raise ConfigError(
        f"the checkpoint was trained by {saved} process(es), this run has {ranks.world_size}",
        where=resume_path,
        hint=f"resume with {saved} process(es) in all (torchrun; none for 1), or start a new run without trainer.resume",
    )


def resized_splits(cfg: DictConfig, manifest, model) -> dict[str, CachedSplit]:
    """Every split of the run at the model's input size, from `<pool_dir>/resized` when an earlier run stored it."""
    build = persistent_split if cfg.data.persistent_cache else cache_split
    return {s: build(manifest, s, model.preprocess, cfg.data.limit, cfg.trainer.seed) for s in run_splits(cfg.data)}


def run(cfg: DictConfig) -> RunResult:
    """Train one model as `cfg` says, tracked in MLflow; returns where everything landed."""
    config = to_plain_dict(cfg)
    ranks, device_choice = distributed.setup(cfg.trainer.device.value)
    try:
        with terminate_as_interrupt():
            return _run(cfg, config, ranks, pick_device(device_choice))
    except MlflowException as err:  # rank 0 alone talks to the store
        raise tracking.unrecorded(err, cfg.tracking.uri) from err
    finally:
        distributed.teardown(ranks)


def _run(cfg: DictConfig, config: dict, ranks: Ranks, device: torch.device) -> RunResult:
    check_values(cfg)
    check_refit(cfg)
    seed_everything(cfg.trainer, device)
    model = model_from_config(config)  # an unknown network fails here, before any data work
    resume_path, resumed = resume_point(cfg, config, ranks)
    ckpt_dir = resume_path.parent if resume_path else distributed.broadcast(Path(cfg.paths.output_dir) / "checkpoints", ranks)
    with claim_checkpoints(ckpt_dir, ranks):
        if ranks.is_main and resumed:
            catch_up_best(resume_path, resumed)  # in the held folder: another resume of the run is refused by now
        elif ranks.is_main:
            clear_earlier_run(ckpt_dir)
        return _train(cfg, config, ranks, device, model, ckpt_dir, resumed)


def resume_point(cfg: DictConfig, config: dict, ranks: Ranks) -> tuple[Path | None, dict | None]:
    """(path, contents) of the checkpoint this run continues, or (None, None) for a new run, once the run is known to
    be recordable (`tracking.check_destination`). Rank 0 alone chooses, as only it asks MLflow (which runs finished);
    the other ranks read the checkpoint it chose, or fail with its refusal."""
    path = distributed.from_main(lambda: _checked_resume_path(cfg, config, ranks), ranks)
    return path, (read_checkpoint(path) if path else None)  # read whole: last.pt is replaced every epoch from now on


def _checked_resume_path(cfg: DictConfig, config: dict, ranks: Ranks) -> Path | None:
    """Rank 0's part of `resume_point`: the checkpoint to continue (None: a new run), the run checked recordable."""
    path, mapped = None, None
    if cfg.trainer.resume or cfg.trainer.resume_from:  # naming the checkpoint is asking to resume it

        def fits(checkpoint: dict, path: Path) -> None:
            check_resume_config(checkpoint["config"], config, path)
            check_resume_world_size(checkpoint, ranks, path)

        finished = partial(tracking.finished, cfg.tracking.uri)
        path, mapped = find_resume_checkpoint(cfg.trainer.resume_from, cfg.paths.runs_dir, cfg.name, fits, finished)
    tracking.check_destination(cfg, mapped["mlflow_run_id"] if mapped else None, path)
    return path


@contextmanager
def claim_checkpoints(ckpt_dir: Path, ranks: Ranks) -> Iterator[None]:
    """Rank 0 holds `ckpt_dir` for the run: runs started in the same second share Hydra's folder (a SLURM array, a
    loop in a script), and a run resumed twice at once (a requeued job whose first copy still runs) would each write
    the other's checkpoints over."""
    if not ranks.is_main:
        yield
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> ConfigError:
        return ConfigError(
            f"process {holder} is training a run in this checkpoint folder now",
            where=ckpt_dir,
            hint="give each run a folder of its own (runs started in the same second share Hydra's: set hydra.run.dir, "
            "e.g. with the SLURM array task id in it), or resume it once that process has ended",
        )

    with held_exclusive(ckpt_dir / TRAINING_LOCK, busy):
        remove_partials(ckpt_dir)  # a checkpoint write killed outright (SIGKILL, the OOM killer) left its temporary file
        yield


def run_checkpoint(ckpt_dir: Path, weights, interrupted: bool) -> Path:
    """The checkpoint a run's result names: an interrupted run's last.pt, which holds where it stopped and is what a
    resume continues (its best.pt is only the best epoch so far, and a refit has none); a finished run's final one."""
    return ckpt_dir / LAST if interrupted else final_checkpoint(ckpt_dir, weights)


def interrupted_advice(ckpt_dir: Path) -> str:
    """What to do after an interruption. Without a last.pt there is nothing to continue, and trainer.resume=true would
    continue the newest other unfinished run of the experiment instead."""
    if (ckpt_dir / LAST).is_file():
        return f"interrupted; continue with trainer.resume=true (checkpoints in {ckpt_dir})"
    return "interrupted before its first epoch was checkpointed: nothing to resume, start it again (without trainer.resume)"


def _export_next(cfg: DictConfig, run_id: str) -> str:
    """What scripts/train.py does after a finished run that it cannot do once the run's end failed: its export."""
    if not cfg.get("export", {}).get("enabled") or cfg.data.get("refit"):
        return ""
    return f"; then make its model package: python scripts/export.py run_id={run_id}"


def _train(cfg: DictConfig, config: dict, ranks: Ranks, device: torch.device, model, ckpt_dir: Path, resumed) -> RunResult:
    manifest, splits, audit = load_data(cfg, model, ranks)
    fit = TrainingLoop(cfg.trainer, cfg.data, model, splits, device, ranks)
    state = fit.restore(resumed) if resumed else TrainState()
    training_started()  # from here the run's folder is kept, however the run ends (it is tracked, or trains)
    if not ranks.is_main:
        interrupted = train_epochs(fit, state, ckpt_dir, config, None)
        metrics = {} if interrupted else final_metrics(fit, state, ckpt_dir)[0]
        return RunResult("", state.best_val_auc, run_checkpoint(ckpt_dir, cfg.trainer.weights, interrupted), ckpt_dir, metrics, interrupted)
    run_id = tracking.start_run(cfg, resume_run_id=resumed["mlflow_run_id"] if resumed else None).info.run_id
    try:
        if resumed:
            tracking.log_resumed_config(resumed["config"], config, state.epoch)
        else:
            sizes = {f"n_{s}": len(splits[s]) for s in splits} | {"sites": ",".join(manifest.sites), "world_size": ranks.world_size}
            tracking.log_run_config(cfg, config, manifest.fingerprint, sizes)
            mlflow.log_dict(audit.to_dict(), "data_audit.json")
            mlflow.set_tag("data_audit", "passed" if audit.ok else "failed, overridden by data.allow_audit_failure")
        print(
            f"MLflow run {run_id} on {device} x{ranks.world_size}; checkpoints in {ckpt_dir}; "
            f"open with `{tracking.ui_command(cfg.tracking.uri)}`"
        )
        interrupted = train_epochs(fit, state, ckpt_dir, config, run_id)
        if interrupted:
            tracking.end_run("KILLED")
            print(f"stopped after epoch {state.epoch}; continue with trainer.resume=true (checkpoint {ckpt_dir / LAST})")
            return RunResult(run_id, state.best_val_auc, run_checkpoint(ckpt_dir, cfg.trainer.weights, True), ckpt_dir, interrupted=True)
        metrics, predictions = final_metrics(fit, state, ckpt_dir)
        log_final(metrics, predictions, state, ckpt_dir, cfg.name, cfg.tracking.log_checkpoint, cfg.trainer.weights)
    except KeyboardInterrupt:
        tracking.end_stopped_run("KILLED")
        print(interrupted_advice(ckpt_dir))
        raise
    except BaseException:
        tracking.end_stopped_run("FAILED")
        raise
    tracking.end_finished_run(cfg.tracking.uri, run_folder(ckpt_dir) / METRICS_FILE, _export_next(cfg, run_id))
    result = RunResult(run_id, state.best_val_auc, run_checkpoint(ckpt_dir, cfg.trainer.weights, False), ckpt_dir, metrics)
    print_summary(result, cfg.tracking.uri, manifest.sites)
    return result
