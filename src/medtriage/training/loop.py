"""The training loop: `TrainingLoop` holds one run's optimiser, learning-rate schedule, class-imbalance
handling, seeded loaders, a train epoch with a progress bar, evaluation and checkpoint state;
`train_epochs` runs epochs until max_epochs or early stopping, checkpointing and tracking each.

Works alone or as one rank of a torchrun job (see medtriage.training.distributed).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from medtriage.config.schema import DataConfig, TrainerConfig
from medtriage.data.torch.datasets import CachedDataset, CachedSplit
from medtriage.errors import ConfigError, MedTriageError
from medtriage.evaluation.metrics import evaluate
from medtriage.evaluation.predictions import Predictions
from medtriage.io.safe_output import copy_atomic
from medtriage.model.checkpoint import BEST, LAST, save_checkpoint
from medtriage.model.predict import predict_logits
from medtriage.optional import optional_import
from medtriage.progress import progress
from medtriage.training import distributed, tracking
from medtriage.training.augmentation import BatchAugment, loader_transforms
from medtriage.training.batch_loader import CachedBatchLoader
from medtriage.training.distributed import SINGLE_PROCESS, Ranks
from medtriage.training.ema import WeightEMA
from medtriage.training.losses import Mixup, make_criterion, mixed_loss, no_mix
from medtriage.training.optimiser import build_optimizer, build_scheduler, scaled_lr, training_autocast, training_forward
from medtriage.training.report import selection_name
from medtriage.training.resume import restore_rng_state, rng_state
from medtriage.training.samplers import SiteStratifiedSampler
from medtriage.training.throughput import EpochClock

monai_data = optional_import("monai.data")

log = logging.getLogger(__name__)


class TrainingDivergedError(MedTriageError):
    """The training loss stopped being a number: the weights are NaN or infinite, and every later step keeps them so."""


class CheckpointWriteError(MedTriageError):
    """A checkpoint could not be written (a full disk, a folder made read-only): the one before it is kept whole."""


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_auc: float = -math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0


class TrainingLoop:
    """Optimiser, schedule, loss and loaders of one run; `epoch()` trains once over the train split."""

    def __init__(
        self,
        trainer: TrainerConfig,
        data: DataConfig,
        model: torch.nn.Module,
        splits: dict[str, CachedSplit],
        device: torch.device,
        ranks: Ranks = SINGLE_PROCESS,
    ):
        """`trainer` and `data` are the config groups of those names (typed dataclasses or their DictConfig)."""
        self.trainer, self.data, self.device, self.ranks = trainer, data, device, ranks
        cuda = device.type == "cuda"
        self.channels_last = self.trainer.channels_last
        self.autocast_dtype = training_autocast(self.trainer.precision.value, device)
        # Evaluation on a CPU stays fp32 and NCHW: the exported fp32 graph is what is served, and held-out scores must
        # not depend on the training precision (fold scores are recomputed from checkpoints and compared).
        self.eval_autocast_dtype = self.autocast_dtype if cuda else None
        self.eval_channels_last = self.channels_last and cuda
        model = model.to(device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.model = distributed.wrap(model, ranks, device)
        self.splits = splits
        on_device = self.trainer.augment_on.value == "device"
        self.dataset = CachedDataset(splits["train"], loader_transforms(data.augment, model.preprocess.spec.size, on_device))
        self.steps_per_epoch = self._steps_per_epoch()
        self.draw_seed = distributed.rank_seed(self.trainer.seed, ranks)  # the model above was built alike on every rank
        self.device_augment = BatchAugment(data.augment, device, self.draw_seed) if on_device else None
        self.batch_loader = None  # nothing left to do per image: gather whole batches from the cache
        if on_device and self.dataset.transform is None:
            self.batch_loader = CachedBatchLoader(splits["train"], data.batch_size, device, self.drop_last, self.trainer.cache_on_device)
        self.train_model = training_forward(self.model, self.trainer.compile)
        lr = scaled_lr(self.trainer, data.batch_size, ranks.world_size)
        self.optimizer = build_optimizer(model, lr, self.trainer.weight_decay, device)
        self.scheduler = build_scheduler(self.optimizer, self.trainer, self.steps_per_epoch)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.criterion = make_criterion(self.trainer, self._class_weights().to(device))
        self.mixup = Mixup.from_config(self.trainer)
        self.ema = WeightEMA.from_config(self.trainer, model)
        if self.ema and ranks.is_main and (shortfall := self.ema.shortfall(self.steps_per_epoch * self.trainer.max_epochs)):
            log.warning(shortfall)
        self._own_global_stream(epoch=0)

    def _own_global_stream(self, epoch: int) -> None:
        """Dropout and drop-connect draw from torch's global generator, seeded alike on every rank so the model starts
        alike: the other ranks move to streams of their own, so their shards are not masked as rank 0's. Rank 0 keeps
        its stream (a run of one process is unchanged)."""
        if not self.ranks.is_main:
            torch.manual_seed(self.draw_seed * 100_003 + epoch)

    @property
    def eval_model(self) -> torch.nn.Module:
        """What is evaluated, selected and checkpointed: the EMA weights when trainer.ema_decay is set."""
        return self.ema.module if self.ema else distributed.unwrap(self.model)

    @property
    def drop_last(self) -> bool:
        """A last batch of one image breaks batch norm: drop the remainder once there is a full batch."""
        return self._images_per_rank() >= self.data.batch_size

    def _images_per_rank(self) -> int:
        return math.ceil(len(self.dataset) / self.ranks.world_size)

    def _steps_per_epoch(self) -> int:
        batches = self._images_per_rank() / self.data.batch_size
        steps = max(1, math.floor(batches) if self.drop_last else math.ceil(batches))
        return min(steps, self.trainer.limit_train_batches or steps)

    def _class_counts(self) -> torch.Tensor:
        counts = torch.bincount(self.splits["train"].labels, minlength=len(self.data.label_names))
        if (counts == 0).any():
            missing = [n for n, c in zip(self.data.label_names, counts.tolist()) if c == 0]
            raise ConfigError(f"no training images of class {missing}", where="data", hint="raise data.limit or check the pool labels")
        return counts

    def _class_weights(self) -> torch.Tensor:
        counts = self._class_counts().float()
        if self.trainer.imbalance.value != "weighted_loss":
            return torch.ones_like(counts)
        return counts.sum() / (len(counts) * counts)

    def loader(self, epoch: int):
        """A loader whose shuffling and augmentation depend only on (seed, rank, epoch): resumable and repeatable.
        Under torchrun the samplers shuffle alike on every rank; the generator seeds only the per-image transforms."""
        generator = torch.Generator().manual_seed(self.draw_seed * 100_003 + epoch)
        sampler = None
        if self.data.site_stratified:
            sampler = self._site_stratified_sampler(epoch)
        elif self.ranks.enabled:
            if self.trainer.imbalance.value == "sampler":
                raise ConfigError(
                    "class-balanced sampling is not available with several processes",
                    where="trainer.imbalance",
                    hint="use trainer.imbalance=weighted_loss under torchrun",
                )
            sampler = DistributedSampler(
                self.dataset, self.ranks.world_size, self.ranks.rank, shuffle=True, seed=self.trainer.seed, drop_last=False
            )
            sampler.set_epoch(epoch)
        elif self.trainer.imbalance.value == "sampler":
            weights = (1.0 / self._class_counts().float())[self.splits["train"].labels]
            sampler = torch.utils.data.WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator)
        if self.batch_loader is not None:
            order = list(sampler) if sampler is not None else torch.randperm(len(self.dataset), generator=generator)
            return self.batch_loader.batches(order)
        loader_class = monai_data.ThreadDataLoader if self.trainer.loader.value == "thread" else monai_data.DataLoader
        return loader_class(
            self.dataset,
            batch_size=self.data.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=self.data.num_workers,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
        )

    def _site_stratified_sampler(self, epoch: int) -> SiteStratifiedSampler:
        sampler = SiteStratifiedSampler(self.splits["train"].sites, self.ranks.world_size, self.ranks.rank, self.trainer.seed)
        sampler.set_epoch(epoch)
        return sampler

    def epoch(self, epoch: int, state: TrainState) -> dict[str, float]:
        """Train once over the training split; returns loss, throughput and learning rate."""
        self.model.train()
        self._own_global_stream(epoch)  # from (seed, rank, epoch) alone, as a resumed run seeds it
        if self.mixup:
            self.mixup.start_epoch(epoch)
        if self.device_augment:
            self.device_augment.reseed(epoch)
        total_loss, seen, started, clock = 0.0, 0, time.perf_counter(), EpochClock(self.device)
        desc = f"epoch {epoch}/{self.trainer.max_epochs}"
        bar = progress(self.loader(epoch), self.steps_per_epoch, desc, "batch", "batches", disable=not self.ranks.is_main)
        for step, (images, labels) in enumerate(bar):
            if step >= self.steps_per_epoch:
                break
            clock.step_begins()
            loss = self.train_step(images, labels)
            state.global_step += 1
            total_loss += loss * len(labels)  # a device tensor: reading it every step would stall the GPU
            seen += len(labels)
            if step % 10 == 0 or step + 1 == self.steps_per_epoch:  # reading the loss waits for the GPU: step time
                bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}", img_s=f"{seen / (time.perf_counter() - started):.0f}")
            clock.step_ends(len(labels))
        bar.close()
        total_loss = float(total_loss)
        elapsed = time.perf_counter() - started
        total_loss, seen = distributed.sum_over_ranks([total_loss, seen], self.ranks)
        check_finite_loss(total_loss, epoch, state)  # summed over ranks: every rank stops, none waits for the others
        distributed.sync_buffers(self.model, self.ranks)
        if self.ema:  # each rank's average took its own batches' statistics: evaluate rank 0's, which is checkpointed
            distributed.sync_buffers(self.ema.module, self.ranks)
        check_finite_weights(distributed.unwrap(self.model), epoch, state)  # alike on every rank, buffers synced
        return {
            **clock.summary(),
            "train/loss": total_loss / max(seen, 1),
            "train/images_per_s": seen / elapsed,
            "train/epoch_s": elapsed,
            "train/lr": self.last_lr,  # of the epoch's last step
        }

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch from `loader` (device augmentation, autocast, EMA included); the loss."""
        images = images.to(self.device, non_blocking=True)
        if self.device_augment:
            images = self.device_augment(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            batch = self.mixup(images, labels) if self.mixup else no_mix(images, labels)
            logits = self.train_model(batch.images)
        loss = mixed_loss(self.criterion, logits.float(), batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used; the scheduler moves on to the next
        self.scheduler.step()
        if self.ema:
            self.ema.update(distributed.unwrap(self.model))
        return loss.detach()

    def evaluate(self, split: str) -> dict[str, float]:
        predictions = self.predict(split)
        return evaluate(predictions.logits, predictions.labels, predictions.sites, split)

    def predict(self, split: str) -> Predictions:
        """Each rank predicts its shard; the gathered predictions are the same on every rank."""
        data = self.splits[split]
        mine = distributed.shard(len(data), self.ranks)
        logits = predict_logits(
            self.eval_model,
            data.images[mine],
            self.trainer.eval_batch_size,
            self.device,
            autocast_dtype=self.eval_autocast_dtype,
            channels_last=self.eval_channels_last,
        )
        parts = [logits, data.labels.numpy()[mine], data.sites[mine], data.row_indices[mine]]
        return Predictions(*distributed.gather_concat(parts, self.ranks))

    def checkpoint(self, state: TrainState, config: dict, run_id: str) -> dict:
        return {
            "model": self.eval_model.state_dict(),
            "config": config,
            **self._ema_state(),
            "epoch": state.epoch,
            "global_step": state.global_step,
            "best_val_auc": state.best_val_auc,
            "best_epoch": state.best_epoch,
            "epochs_since_best": state.epochs_since_best,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "world_size": self.ranks.world_size,  # the shards, the global batch and the schedule's length depend on it
            "mlflow_run_id": run_id,
        }

    def _ema_state(self) -> dict:
        """With EMA, `model` holds the averaged weights; the raw ones are kept to resume training."""
        if not self.ema:
            return {}
        return {"train_model": distributed.unwrap(self.model).state_dict(), "ema_updates": self.ema.updates}

    def restore(self, checkpoint: dict) -> TrainState:
        distributed.unwrap(self.model).load_state_dict(checkpoint.get("train_model", checkpoint["model"]))
        if self.ema:
            self.ema.module.load_state_dict(checkpoint["model"])
            self.ema.updates = checkpoint.get("ema_updates", 0)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_state(checkpoint["rng"])  # rank 0's, as rank 0 wrote the checkpoint
        self._own_global_stream(checkpoint["epoch"])
        return TrainState(
            checkpoint["epoch"],
            checkpoint["global_step"],
            checkpoint["best_val_auc"],
            checkpoint["best_epoch"],
            checkpoint["epochs_since_best"],
        )


def check_finite_loss(total_loss: float, epoch: int, state: TrainState) -> None:
    """Stop before a diverged epoch is checkpointed (or, in a refit, exported): checked once per epoch, as reading the
    loss every step would make each step wait for the device."""
    if math.isfinite(total_loss):
        return
    raise _diverged(f"the training loss of epoch {epoch} is {total_loss}: the weights diverged", epoch, state)


def check_finite_weights(model: torch.nn.Module, epoch: int, state: TrainState) -> None:
    """Each step's loss is of the weights before it: a step that overflowed late in the epoch leaves weights that are
    not numbers behind a finite loss, which a refit (no validation to meet them) would checkpoint and export."""
    finite = [value.isfinite().all() for value in model.state_dict().values() if value.is_floating_point()]
    if bool(torch.stack(finite).all()):  # one wait for the device per epoch
        return
    raise _diverged(f"the weights after epoch {epoch} are not all finite: its last steps diverged", epoch, state)


def _diverged(what: str, epoch: int, state: TrainState) -> TrainingDivergedError:
    return TrainingDivergedError(
        what,
        where=f"epoch {epoch} (up to global step {state.global_step})",
        hint="lower trainer.lr (or trainer.lr_scaling), raise trainer.warmup_epochs, or try trainer.precision=fp32; "
        "the checkpoint of the last epoch before it is kept, but a resume repeats the same steps: start a new run",
    )


# --- epochs ------------------------------------------------------------------------------------


def selection_score(metrics: dict[str, float]) -> float:
    """Validation AUC; accuracy only when AUC is undefined (a single class in a tiny validation set)."""
    if "val/auc" not in metrics:
        log.warning("validation AUC undefined (one class only): selecting the best epoch by accuracy")
    return metrics.get("val/auc", metrics["val/acc"])


def validate_epoch(fit: TrainingLoop, state: TrainState, metrics: dict[str, float], epoch: int) -> bool:
    """Add the epoch's validation metrics to `metrics`; True when the epoch is the best so far."""
    metrics.update(fit.evaluate("val"))
    score = selection_score(metrics)
    improved = score > state.best_val_auc
    if improved:
        state.best_val_auc, state.best_epoch, state.epochs_since_best = score, epoch, 0
    else:
        state.epochs_since_best += 1
    metrics["best_val_auc"] = state.best_val_auc
    return improved


def train_epochs(fit: TrainingLoop, state: TrainState, ckpt_dir: Path, config: dict, run_id: str | None) -> bool:
    """Epochs until max_epochs or early stopping; True when stopped by trainer.stop_after_epochs. Without a validation
    split (a refit) no epoch is ever best: the run ends with its last weights."""
    trainer, done_here, validated = fit.trainer, 0, "val" in fit.splits
    while state.epoch < trainer.max_epochs and not stopped_early(trainer, state):  # resumed after it stopped early
        epoch = state.epoch + 1
        metrics = fit.epoch(epoch, state)
        improved = validated and validate_epoch(fit, state, metrics, epoch)
        state.epoch = epoch
        if fit.ranks.is_main:
            tracking.log_metrics(metrics, step=epoch)
            save_epoch(ckpt_dir, fit.checkpoint(state, config, run_id), improved)
            validation = (
                f", {selection_name(metrics)} {metrics.get('val/auc', metrics.get('val/acc', float('nan'))):.4f} (best {state.best_val_auc:.4f} @ {state.best_epoch})"
                if validated
                else ""
            )
            log.info("epoch %d: loss %.4f%s, %.0f img/s", epoch, metrics["train/loss"], validation, metrics["train/images_per_s"])
        done_here += 1
        if stopped_early(trainer, state):
            log.info("early stopping: no better %s for %d epochs", selection_name(metrics), state.epochs_since_best)
            break
        if trainer.stop_after_epochs and done_here >= trainer.stop_after_epochs and state.epoch < trainer.max_epochs:
            return True
    return False


def save_epoch(ckpt_dir: Path, checkpoint: dict, improved: bool) -> None:
    """last.pt of the epoch, copied to best.pt when it `improved`. Both are written atomically: a write that fails (a
    full disk) leaves the files as they were, and is said in one line, with what a resume continues."""
    path = ckpt_dir / LAST
    try:
        save_checkpoint(path, **checkpoint)
        path = ckpt_dir / BEST
        if improved:
            copy_atomic(ckpt_dir / LAST, path)  # a crash mid-copy never leaves a truncated best.pt
    except OSError as err:
        raise _unwritten(path, checkpoint["epoch"], err) from err


def _unwritten(path: Path, epoch: int, err: OSError) -> CheckpointWriteError:
    kept = path.with_name(LAST)
    resume = (
        f"{kept} is whole: continue the run with trainer.resume=true"
        if kept.is_file()
        else "no epoch was checkpointed before: start the run again"
    )
    return CheckpointWriteError(
        f"the checkpoint of epoch {epoch} could not be written ({err.strerror or err})",
        where=path,
        hint=f"free space in the folder or make it writable; {resume}",
    )


def stopped_early(trainer, state: TrainState) -> bool:
    """No better validation AUC for trainer.early_stopping_patience epochs."""
    return bool(trainer.early_stopping_patience) and state.epochs_since_best >= trainer.early_stopping_patience
