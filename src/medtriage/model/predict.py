"""Logits of a trained model on one split of a pooled manifest (evaluation, calibration, export parity)."""

from __future__ import annotations

import numpy as np
import torch

from medtriage.data.torch.datasets import CachedSplit, cache_split
from medtriage.evaluation.predictions import Predictions


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Logits `[N, K]` (float32) of `images` `[N, C, H, W]`, in batches; the model is left in eval mode."""
    model.eval()
    device = torch.device(device)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs.append(model(batch).float().cpu())
    return torch.cat(outputs).numpy()


def predict_cached(model: torch.nn.Module, split: CachedSplit, batch_size: int = 256, device="cpu", **kwargs) -> Predictions:
    logits = predict_logits(model, split.images, batch_size, device, **kwargs)
    return Predictions(logits, split.labels.numpy(), split.sites, split.row_indices)


def predict(model: torch.nn.Module, manifest, split: str, batch_size: int = 256, device: str = "cpu") -> Predictions:
    """Predictions on every image of `split`; each image is resized by the model's own resize first."""
    model = model.to(device)
    return predict_cached(model, cache_split(manifest, split, model.preprocess), batch_size, device)
