"""Exponential moving average of a model's weights (config: trainer.ema_decay).

When on, the averaged copy is what the run evaluates, selects and checkpoints (`model` in the
checkpoint), so export and serving get the EMA weights; the raw weights are kept for resuming.
"""

from __future__ import annotations

import copy

import torch

from medtriage.errors import ConfigError


class WeightEMA:
    """EMA of parameters and buffers (batch-norm statistics included).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates: a run of a few hundred
    steps would otherwise stay dominated by its random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay must be in (0, 1), got {decay}", where="trainer.ema_decay", hint="e.g. 0.99 or 0.999")
        self.decay, self.updates = float(decay), 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def from_config(cls, trainer, model: torch.nn.Module) -> WeightEMA | None:
        decay = getattr(trainer, "ema_decay", None)
        return cls(model, decay) if decay else None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        for averaged, live in zip(self.module.state_dict().values(), model.state_dict().values()):
            if averaged.dtype.is_floating_point:
                averaged.lerp_(live.to(averaged.dtype), 1.0 - decay)
            else:
                averaged.copy_(live)  # counters such as num_batches_tracked
