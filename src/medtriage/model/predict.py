"""Logits of a trained model on one split of a pooled manifest (evaluation, calibration, export parity)."""

from __future__ import annotations

import numpy as np
import torch

from medtriage.data.torch.datasets import CachedSplit, cache_split
from medtriage.evaluation.predictions import Predictions
from medtriage.model.averaging import PROBABILITY_FLOOR, EnsembleNet


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Logits `[N, K]` (float32) of `images` `[N, C, H, W]`, in batches; the model is left in eval mode. No images give
    `[0, K]` (a rank's shard of a split smaller than the world), so that the ranks' parts concatenate: K is read from
    one blank image, as models refuse an empty batch."""
    model.eval()
    device = torch.device(device)
    if not len(images):
        blank = predict_logits(model, images.new_zeros(1, *images.shape[1:]), 1, device, autocast_dtype, channels_last)
        return blank[:0]
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
    return predict_split(model, manifest, split, batch_size=batch_size, device=device)


def predict_split(
    model: torch.nn.Module, manifest, split: str, limit: int | None = None, seed: int = 0, batch_size: int = 256, device: str = "cpu"
) -> Predictions:
    """`predict` on the rows of `split` that `cache_split` takes (a `limit` sampled by `seed`). An ensemble whose members
    take several input sizes is scored one size at a time on images resized once to it, and the sizes' probabilities
    are averaged by member count: what its graph computes from the original images."""
    groups = model.size_groups() if isinstance(model, EnsembleNet) else [(model, 1)]
    parts = [
        predict_cached(part.to(device), cache_split(manifest, split, part.preprocess, limit, seed), batch_size, device)
        for part, _ in groups
    ]
    return parts[0] if len(parts) == 1 else _member_weighted_mean(parts, [count for _, count in groups])


def _member_weighted_mean(parts: list[Predictions], counts: list[int]) -> Predictions:
    """The mean probability of `parts` (log-probability outputs of ensembles of `counts` members), as log-probabilities."""
    if any(not np.array_equal(part.row_indices, parts[0].row_indices) for part in parts):
        raise RuntimeError("the input sizes of one ensemble were scored on different images")
    probabilities = sum(count * np.exp(part.logits.astype(np.float64)) for part, count in zip(parts, counts)) / sum(counts)
    logits = np.log(np.clip(probabilities, PROBABILITY_FLOOR, None)).astype(np.float32)
    return Predictions(logits, parts[0].labels, parts[0].sites, parts[0].row_indices)
