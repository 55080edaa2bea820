"""Exponential moving average of a model's weights (config: trainer.ema_decay, trainer.ema_warmup).

When on, the averaged copy is what the run evaluates, selects and checkpoints (`model` in the
checkpoint), so export and serving get the EMA weights; the raw weights are kept for resuming.
"""

from __future__ import annotations

import copy
import math

import torch

from medtriage.config.schema import EmaWarmup
from medtriage.errors import ConfigError


class WeightEMA:
    """EMA of parameters and buffers (batch-norm statistics included).

    `warmup` keeps the random initial weights from dominating a short run: "ramp" caps the decay at
    (1 + n) / (10 + n) after n updates; "debiased" uses the configured decay from the start, bias-corrected, so the
    average holds only trained weights, each weighted decay^age.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: EmaWarmup | str = EmaWarmup.ramp):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay must be in (0, 1), got {decay}", where="trainer.ema_decay", hint="e.g. 0.99 or 0.999")
        try:
            self.warmup = EmaWarmup(getattr(warmup, "value", warmup))
        except ValueError:
            choices = " or ".join(w.value for w in EmaWarmup)
            raise ConfigError(f"unknown EMA warm-up '{warmup}'", where="trainer.ema_warmup", hint=choices) from None
        self.decay, self.updates = float(decay), 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def from_config(cls, trainer, model: torch.nn.Module) -> WeightEMA | None:
        decay = getattr(trainer, "ema_decay", None)
        return cls(model, decay, getattr(trainer, "ema_warmup", EmaWarmup.ramp)) if decay else None

    def current_decay(self) -> float:
        """The decay of update number `self.updates` (counted from 1)."""
        n, d = self.updates, self.decay
        if self.warmup is EmaWarmup.debiased:
            if n <= 1:
                return 0.0  # the first update copies the trained weights
            # c_n = a_n / (1 - d^n) with a_n = d a_(n-1) + (1 - d) x_n, written as one blend of c_(n-1) and x_n
            return d * (1.0 - d ** (n - 1)) / (1.0 - d**n)
        return min(d, _ramp(n))

    def updates_to_reach_decay(self) -> int:
        """Updates before the configured decay applies: the ramp's length, none when debiased."""
        if self.warmup is EmaWarmup.debiased:
            return 0
        needed = math.ceil((10 * self.decay - 1) / (1 - self.decay))
        # The closed form is off by one where its float rounding differs from the ramp's own (decay 0.9: 81, not 80).
        while needed > 0 and _ramp(needed - 1) >= self.decay:
            needed -= 1
        while _ramp(needed) < self.decay:
            needed += 1
        return needed

    def shortfall(self, total_updates: int) -> str | None:
        """What to tell a run of `total_updates` updates whose ramp never reaches the configured decay."""
        needed = self.updates_to_reach_decay()
        if needed <= total_updates:
            return None
        highest = _ramp(total_updates)
        return (
            f"trainer.ema_decay={self.decay:g} is never reached: the EMA ramp needs {needed} updates and this run makes "
            f"{total_updates}, so the decay stays at or below {highest:.4f}; set trainer.ema_warmup=debiased to average "
            "with the configured decay from the first update"
        )

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        for averaged, live in zip(self.module.state_dict().values(), model.state_dict().values()):
            if averaged.dtype.is_floating_point:
                averaged.lerp_(live.to(averaged.dtype), 1.0 - decay)
            else:
                averaged.copy_(live)  # counters such as num_batches_tracked


def _ramp(updates: int) -> float:
    """The ramp's cap on the decay after `updates` updates."""
    return (1 + updates) / (10 + updates)
