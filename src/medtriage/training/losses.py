"""Training-recipe knobs kept out of the engine: label smoothing and mixup (config: trainer.*).

Both are off by default (label_smoothing=0, mixup_alpha=0), so a run without them is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medtriage.errors import ConfigError


def make_criterion(trainer, class_weights: torch.Tensor) -> torch.nn.CrossEntropyLoss:
    """Class-weighted cross-entropy, with label smoothing when trainer.label_smoothing > 0."""
    smoothing = float(getattr(trainer, "label_smoothing", 0.0) or 0.0)
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"label smoothing must be in [0, 1), got {smoothing}", where="trainer.label_smoothing")
    return torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=smoothing)


@dataclass
class MixedBatch:
    images: torch.Tensor
    labels: torch.Tensor
    partner_labels: torch.Tensor  # labels of the images mixed in
    lam: float  # weight of `labels` (1.0 = no mixing)


class Mixup:
    """Mixup (Zhang et al. 2018): convex pairs of images, loss mixed with the same weight.

    The mixing weights and pairings come from a generator reseeded per (seed, epoch), so a
    resumed run mixes exactly as an uninterrupted one.
    """

    def __init__(self, alpha: float, seed: int = 0):
        self.alpha, self.seed = float(alpha), seed
        self.rng = np.random.default_rng(seed)
        self.torch_rng = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, trainer) -> Mixup | None:
        alpha = float(getattr(trainer, "mixup_alpha", 0.0) or 0.0)
        return cls(alpha, trainer.seed) if alpha > 0 else None

    def start_epoch(self, epoch: int) -> None:
        self.rng = np.random.default_rng([self.seed, epoch])
        self.torch_rng = torch.Generator().manual_seed(self.seed * 100_003 + epoch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> MixedBatch:
        lam = float(self.rng.beta(self.alpha, self.alpha))
        order = torch.randperm(len(labels), generator=self.torch_rng).to(images.device)
        mixed = lam * images + (1.0 - lam) * images[order]
        return MixedBatch(mixed, labels, labels[order], lam)


def no_mix(images: torch.Tensor, labels: torch.Tensor) -> MixedBatch:
    return MixedBatch(images, labels, labels, 1.0)


def mixed_loss(criterion, logits: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
    loss = criterion(logits, batch.labels)
    if batch.lam < 1.0:
        loss = batch.lam * loss + (1.0 - batch.lam) * criterion(logits, batch.partner_labels)
    return loss
