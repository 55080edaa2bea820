"""Settings that make a training step faster without changing what it computes (much).

- learning-rate scaling for large (global) batches: `trainer.lr` is the rate at
  `trainer.lr_reference_batch` images per step; `lr_scaling=linear` multiplies it by
  global_batch / reference (Goyal et al. 2017), `sqrt` by the square root (often safer with Adam);
- fused AdamW on CUDA (one kernel for all parameters);
- the learning-rate schedule (`trainer.schedule`): warm-up + cosine, or one-cycle (Smith & Topin 2019);
- `trainer.compile=true`: the training forward/backward through `torch.compile` (the first steps
  compile and are slow; evaluation and checkpoints keep the plain module);
- `trainer.precision=bf16`: the training forward in bf16 autocast (weights, optimiser and loss stay fp32), on CUDA
  and on CPUs with native bf16 (AVX512-BF16 or AMX); `python -m benchmarks.training --precision` measures the gain.
"""

from __future__ import annotations

import functools
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


def build_scheduler(optimizer: torch.optim.Optimizer, trainer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step schedule over `trainer.max_epochs * steps_per_epoch` steps that `trainer.schedule` names."""
    total = max(2, trainer.max_epochs * steps_per_epoch)
    if getattr(trainer.schedule, "value", trainer.schedule) == "one_cycle":
        peak = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total, pct_start=trainer.one_cycle_pct_start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(warmup_cosine, trainer=trainer, steps_per_epoch=steps_per_epoch))


def warmup_cosine(step: int, trainer, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at the last step of max_epochs (a factor of trainer.lr)."""
    warmup = max(1, round(trainer.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    last = max(warmup + 1, trainer.max_epochs * steps_per_epoch) - 1  # steps count from 0: the run's last one
    progress = min(1.0, (step - warmup) / max(1, last - warmup))
    floor = trainer.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def training_forward(model: torch.nn.Module, compile_model: bool, backend: str = "inductor") -> torch.nn.Module:
    """The module the training step calls: `model` itself, or a compiled view sharing its parameters."""
    if not compile_model:
        return model
    log.info("compiling the training step with torch.compile (the first steps are slow)")
    return torch.compile(model, backend=backend)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX (elsewhere it is emulated)."""
    return device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def training_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training forward: bf16 when `precision` asks for it, else none (fp32).

    Without native bf16, a CPU emulates it more slowly than fp32: the run still does what was asked, and says so.
    """
    if precision != "bf16":
        return None
    if not native_bf16(device):
        log.warning(
            "trainer.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is slower than fp32: "
            "set trainer.precision=fp32 on this machine"
        )
    return torch.bfloat16
