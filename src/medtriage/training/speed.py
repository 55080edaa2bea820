"""Settings that make a training step faster without changing what it computes (much).

- learning-rate scaling for large (global) batches: `trainer.lr` is the rate at
  `trainer.lr_reference_batch` images per step; `lr_scaling=linear` multiplies it by
  global_batch / reference (Goyal et al. 2017), `sqrt` by the square root (often safer with Adam);
- fused AdamW on CUDA (one kernel for all parameters);
- `trainer.compile=true`: the training forward/backward through `torch.compile` (the first steps
  compile and are slow; evaluation and checkpoints keep the plain module).
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def scaled_lr(trainer, batch_size: int, world_size: int = 1) -> float:
    """The learning rate for a global batch of batch_size * world_size images."""
    rule = getattr(trainer.lr_scaling, "value", trainer.lr_scaling)
    ratio = batch_size * world_size / trainer.lr_reference_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
    return trainer.lr * factor


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # the fused kernel exists for CUDA tensors only
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)


def training_forward(model: torch.nn.Module, compile_model: bool, backend: str = "inductor") -> torch.nn.Module:
    """The module the training step calls: `model` itself, or a compiled view sharing its parameters."""
    if not compile_model:
        return model
    log.info("compiling the training step with torch.compile (the first steps are slow)")
    return torch.compile(model, backend=backend)
