"""From a pooled manifest to training-ready tensors: sample, resize once, cache, augment.

Pool images keep their acquired size (it differs per site). The model's own `preprocess.resize`
is applied once per image when the split is cached, so batches stack and the in-model resize is
an identity during training; the exported graph performs the same resize on served images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medtriage.data.manifest import Manifest
from medtriage.errors import ConfigError, DataNotFoundError
from medtriage.optional import optional_import
from medtriage.progress import progress

T = optional_import("monai.transforms")
pd = optional_import("pandas")
stain_augment = optional_import("medtriage.data.torch.stain_augment")  # imports MONAI


def limit_rows(rows, limit: int | None, seed: int):
    """About `limit` rows, sampled evenly across (site, label) groups so every group stays present.

    Each group keeps its rounded share and at least one row, so the result can exceed `limit` by up to the
    number of groups (always when the groups outnumber `limit`).
    """
    if limit is None or len(rows) <= limit:
        return rows
    fraction = limit / len(rows)
    picked = [
        group.sample(n=max(1, round(len(group) * fraction)), random_state=seed) for _, group in rows.groupby(["site", "label"], sort=True)
    ]
    return pd.concat(picked).sort_index()


@dataclass
class CachedSplit:
    """One split resized to the model's input size: everything the engine needs per image."""

    images: torch.Tensor  # float32 [N, C, S, S] in [0, 1]
    labels: torch.Tensor  # int64 [N]
    sites: np.ndarray  # str [N]
    row_indices: np.ndarray  # positions in manifest.rows

    def __len__(self) -> int:
        return len(self.labels)


def cache_split(manifest: Manifest, split: str, preprocess, limit: int | None = None, seed: int = 0) -> CachedSplit:
    """Decode-free (the pool caches pixels) load of one split, resized once by the model's own resize."""
    rows = limit_rows(manifest.split(split), limit, seed)
    if len(rows) == 0:
        raise DataNotFoundError(f"split '{split}' is empty", where=manifest.pool_dir, hint="rebuild the pool or lower the limit")
    positions = np.flatnonzero(manifest.rows.index.isin(rows.index))
    channels = preprocess.spec.in_channels
    images = []
    for i in progress(positions, len(positions), f"cache {split}", "image", disable=len(positions) < 2000, leave=False):
        pixels = torch.from_numpy(manifest.image(int(i)))
        if pixels.shape[0] != channels:
            raise ConfigError(
                f"image has {pixels.shape[0]} channels, the model expects {channels}",
                where=f"{manifest.rows.iloc[i]['path']}",
                hint="set model.preprocess.in_channels to match the pool",
            )
        with torch.no_grad():
            images.append(preprocess.resize(pixels[None])[0])
    return CachedSplit(
        images=torch.stack(images).contiguous(),
        labels=torch.as_tensor(manifest.rows["label"].to_numpy()[positions], dtype=torch.int64),
        sites=manifest.rows["site"].astype(str).to_numpy()[positions],
        row_indices=positions,
    )


def train_transforms(augment, size: int):
    """Small affine + intensity jitter + noise (MONAI), on channel-first tensors, clamped to [0, 1]. No vertical flip."""
    if not augment.enabled:
        return T.Compose([])
    p = augment.prob
    return T.Compose(
        [
            *_stain_transforms(augment),
            T.RandAffine(
                prob=p,
                rotate_range=np.deg2rad(augment.rotate_deg),
                scale_range=augment.scale,
                translate_range=augment.translate * size,
                padding_mode="border",
                mode="bilinear",
                spatial_size=None,
            ),
            *([T.RandAdjustContrast(prob=p, gamma=gamma_range(augment.gamma))] if getattr(augment, "gamma", 0.0) else []),
            T.RandScaleIntensity(factors=augment.intensity_scale, prob=p),
            T.RandShiftIntensity(offsets=augment.intensity_shift, prob=p),
            T.RandGaussianNoise(prob=p, std=augment.noise_std),
            T.Lambda(func=_to_unit_range),
        ]
    )


def _to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """Decoded pixels live in [0, 1] and the served model never sees more: shift, gain and noise are clamped back, as
    the device augmentation does (a module function, so DataLoader workers can pickle it)."""
    return image.clamp(0.0, 1.0)


def gamma_range(gamma: float) -> tuple[float, float]:
    """The powers tone-curve jitter draws from: [1 / (1 + gamma), 1 + gamma] (symmetric in log)."""
    return 1.0 / (1.0 + gamma), 1.0 + gamma


def _stain_transforms(augment) -> list:
    """H&E stain jitter first, on the tile's own colours (RGB tiles only; off when both amounts are 0)."""
    sigma, bias = getattr(augment, "stain_sigma", 0.0), getattr(augment, "stain_bias", 0.0)
    if not (sigma or bias):
        return []
    return [stain_augment.RandStainAugment(sigma, bias)]


class CachedDataset(torch.utils.data.Dataset):
    """(image, label) pairs from a CachedSplit, augmented on the fly when a transform is given."""

    def __init__(self, split: CachedSplit, transform=None):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image = self.split.images[i]
        if self.transform is not None:
            image = _plain(self.transform(image))
        return image, self.split.labels[i]


def _plain(image) -> torch.Tensor:
    """MONAI returns MetaTensors; batches of plain tensors collate faster and export cleanly."""
    as_tensor = getattr(image, "as_tensor", None)
    return (as_tensor() if as_tensor else torch.as_tensor(image)).float()
