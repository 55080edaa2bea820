"""One run's training machinery: optimiser, warm-up + cosine schedule, class-imbalance handling,
seeded loaders, a train epoch with a progress bar, evaluation and checkpoint state.

Works alone or as one rank of a torchrun job (see medtriage.training.distributed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.utils.data import DistributedSampler

from medtriage.data.datasets import CachedDataset, CachedSplit, train_transforms
from medtriage.errors import ConfigError
from medtriage.training import distributed
from medtriage.training.checkpoint import restore_rng_state, rng_state
from medtriage.training.distributed import Ranks
from medtriage.training.metrics import evaluate
from medtriage.training.predict import Predictions, predict_logits


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_auc: float = -math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0


class Fit:
    """Optimiser, schedule, loss and loaders of one run; `epoch()` trains once over the train split."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, splits: dict[str, CachedSplit], device: torch.device,
                 ranks: Ranks = Ranks()):
        self.cfg, self.trainer, self.device, self.ranks = cfg, cfg.trainer, device, ranks
        cuda = device.type == "cuda"
        self.channels_last = cuda and self.trainer.channels_last
        self.autocast_dtype = torch.bfloat16 if cuda and self.trainer.precision.value == "bf16" else None
        model = model.to(device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.model = distributed.wrap(model, ranks, device)
        self.splits = splits
        self.dataset = CachedDataset(splits["train"], train_transforms(cfg.data.augment, cfg.model.preprocess.size))
        self.steps_per_epoch = self._steps_per_epoch()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.trainer.lr, weight_decay=self.trainer.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.criterion = torch.nn.CrossEntropyLoss(weight=self._class_weights().to(device))

    @property
    def drop_last(self) -> bool:
        """A last batch of one image breaks batch norm: drop the remainder once there is a full batch."""
        return self._images_per_rank() >= self.cfg.data.batch_size

    def _images_per_rank(self) -> int:
        return math.ceil(len(self.dataset) / self.ranks.world_size)

    def _steps_per_epoch(self) -> int:
        batches = self._images_per_rank() / self.cfg.data.batch_size
        steps = max(1, math.floor(batches) if self.drop_last else math.ceil(batches))
        return min(steps, self.trainer.limit_train_batches or steps)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to min_lr_ratio at the last step of max_epochs."""
        warmup = max(1, round(self.trainer.warmup_epochs * self.steps_per_epoch))
        if step < warmup:
            return (step + 1) / warmup
        total = max(warmup + 1, self.trainer.max_epochs * self.steps_per_epoch)
        progress = min(1.0, (step - warmup) / (total - warmup))
        floor = self.trainer.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def _class_counts(self) -> torch.Tensor:
        counts = torch.bincount(self.splits["train"].labels, minlength=len(self.cfg.data.label_names))
        if (counts == 0).any():
            missing = [n for n, c in zip(self.cfg.data.label_names, counts.tolist()) if c == 0]
            raise ConfigError(f"no training images of class {missing}", where="data", hint="raise data.limit or check the pool labels")
        return counts

    def _class_weights(self) -> torch.Tensor:
        counts = self._class_counts().float()
        if self.trainer.imbalance.value != "weighted_loss":
            return torch.ones_like(counts)
        return counts.sum() / (len(counts) * counts)

    def loader(self, epoch: int):
        """A loader whose shuffling and augmentation depend only on (seed, epoch): resumable and repeatable."""
        from monai.data import DataLoader, ThreadDataLoader

        generator = torch.Generator().manual_seed(self.trainer.seed * 100_003 + epoch)
        sampler = None
        if self.ranks.enabled:
            if self.trainer.imbalance.value == "sampler":
                raise ConfigError("class-balanced sampling is not available with several processes", where="trainer.imbalance",
                                  hint="use trainer.imbalance=weighted_loss under torchrun")
            sampler = DistributedSampler(self.dataset, self.ranks.world_size, self.ranks.rank, shuffle=True,
                                         seed=self.trainer.seed, drop_last=False)
            sampler.set_epoch(epoch)
        elif self.trainer.imbalance.value == "sampler":
            weights = (1.0 / self._class_counts().float())[self.splits["train"].labels]
            sampler = torch.utils.data.WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator)
        loader_class = ThreadDataLoader if self.trainer.loader.value == "thread" else DataLoader
        return loader_class(
            self.dataset, batch_size=self.cfg.data.batch_size, shuffle=sampler is None, sampler=sampler,
            generator=generator, num_workers=self.cfg.data.num_workers, drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
        )

    def epoch(self, epoch: int, state: TrainState) -> dict[str, float]:
        """Train once over the training split; returns loss, throughput and learning rate."""
        from tqdm.auto import tqdm

        self.model.train()
        total_loss, seen, started = 0.0, 0, time.perf_counter()
        bar = tqdm(self.loader(epoch), total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.trainer.max_epochs}",
                   unit="batch", disable=not self.ranks.is_main)
        for step, (images, labels) in enumerate(bar):
            if step >= self.steps_per_epoch:
                break
            loss = self._step(images, labels)
            state.global_step += 1
            total_loss += loss * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", img_s=f"{seen / (time.perf_counter() - started):.0f}")
        bar.close()
        elapsed = time.perf_counter() - started
        total_loss, seen = distributed.sum_over_ranks([total_loss, seen], self.ranks)
        distributed.sync_buffers(self.model, self.ranks)
        return {"train/loss": total_loss / max(seen, 1), "train/images_per_s": seen / elapsed,
                "train/epoch_s": elapsed, "train/lr": self.scheduler.get_last_lr()[0]}

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(images)
        loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def evaluate(self, split: str) -> dict[str, float]:
        predictions = self.predict(split)
        return evaluate(predictions.logits, predictions.labels, predictions.sites, split)

    def predict(self, split: str) -> Predictions:
        """Each rank predicts its shard; the gathered predictions are the same on every rank."""
        data = self.splits[split]
        mine = distributed.shard(len(data), self.ranks)
        logits = predict_logits(distributed.unwrap(self.model), data.images[mine], self.trainer.eval_batch_size,
                                self.device, autocast_dtype=self.autocast_dtype, channels_last=self.channels_last)
        parts = [logits, data.labels.numpy()[mine], data.sites[mine], data.row_indices[mine]]
        return Predictions(*distributed.gather_concat(parts, self.ranks))

    def checkpoint(self, state: TrainState, config: dict, run_id: str) -> dict:
        return {
            "model": distributed.unwrap(self.model).state_dict(), "config": config, "epoch": state.epoch,
            "global_step": state.global_step, "best_val_auc": state.best_val_auc, "best_epoch": state.best_epoch,
            "epochs_since_best": state.epochs_since_best, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "mlflow_run_id": run_id,
        }

    def restore(self, checkpoint: dict) -> TrainState:
        distributed.unwrap(self.model).load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_state(checkpoint["rng"])
        return TrainState(checkpoint["epoch"], checkpoint["global_step"], checkpoint["best_val_auc"],
                          checkpoint["best_epoch"], checkpoint["epochs_since_best"])
