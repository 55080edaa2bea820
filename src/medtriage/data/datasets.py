"""From a data config to training-ready tensors: pick the source, load its pool, cache, augment.

Pool images keep their acquired size (it differs per site). The model's own `preprocess.resize`
is applied once per image when the split is cached, so batches stack and the in-model resize is
an identity during training; the exported graph performs the same resize on served images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from medtriage.data.manifest import MANIFEST_FILE, Manifest, load_manifest
from medtriage.errors import ConfigError, DataNotFoundError


def _npz_pool(data) -> Manifest:
    from medtriage.data.sources.medmnist import build_npz_pool

    pool_dir = Path(data.pool_dir)
    if (pool_dir / MANIFEST_FILE).is_file():
        manifest = load_manifest(pool_dir)
    elif not data.npz_path:
        raise ConfigError("source 'npz' needs a path", where="data.npz_path", hint="e.g. data/samples/pneumoniamnist_28.npz")
    else:
        manifest = build_npz_pool(data.npz_path, pool_dir, list(data.label_names))
    print(manifest.summary())
    return manifest


def _sites_pool(data) -> Manifest:
    sites_dir = Path(data.sites_dir or "")
    if not data.sites_dir or not sites_dir.is_dir():
        raise DataNotFoundError(
            "site folders not found", where=sites_dir if data.sites_dir else "data.sites_dir",
            hint="create them with `python scripts/make_sites.py` then `python scripts/ingest_sites.py --create-keys` "
            "(de-identified pool), or point data.sites_dir at existing site folders",
        )
    from medtriage.data.pool import build_sites_pool

    return build_sites_pool(sites_dir, Path(data.pool_dir), seed=data.pool_seed)  # reuses an unchanged pool


def _tiles_pool(data) -> Manifest:
    from medtriage.data.sources.pathology_tiles import SyntheticTilesConfig, ensure_synthetic_tile_pool

    settings = OmegaConf.to_object(data.tiles) if OmegaConf.is_config(data.tiles) else data.tiles
    return ensure_synthetic_tile_pool(data.pool_dir, settings if isinstance(settings, SyntheticTilesConfig) else SyntheticTilesConfig(**settings))


# data.source -> builder of the pooled manifest (each prints its per-site summary). New sources register here.
SOURCES: dict[str, Callable[..., Manifest]] = {"npz": _npz_pool, "sites": _sites_pool, "tiles": _tiles_pool}


def load_pool(data) -> Manifest:
    """The pooled manifest for `cfg.data`, built on first use."""
    if data.source not in SOURCES:
        raise ConfigError(f"unknown data source '{data.source}'", where="data.source", hint=f"choose one of: {', '.join(SOURCES)}")
    manifest = SOURCES[data.source](data)
    if list(manifest.label_names) != list(data.label_names):
        raise ConfigError(
            f"pool labels {manifest.label_names} differ from the config's {list(data.label_names)}",
            where="data.label_names", hint=f"set data.label_names to {manifest.label_names} or rebuild {manifest.pool_dir}",
        )
    if getattr(data, "holdout_site", None):
        from medtriage.data.holdout import hold_out_site

        manifest = hold_out_site(manifest, data.holdout_site)
    return manifest


def limit_rows(rows, limit: int | None, seed: int):
    """At most `limit` rows, sampled evenly across (site, label) groups so every group stays present."""
    if limit is None or len(rows) <= limit:
        return rows
    fraction = limit / len(rows)
    picked = [
        group.sample(n=max(1, round(len(group) * fraction)), random_state=seed)
        for _, group in rows.groupby(["site", "label"], sort=True)
    ]
    import pandas as pd

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
    for i in tqdm(positions, desc=f"cache {split}", unit="img", leave=False, disable=len(positions) < 2000):
        pixels = torch.from_numpy(manifest.image(int(i)))
        if pixels.shape[0] != channels:
            raise ConfigError(
                f"image has {pixels.shape[0]} channels, the model expects {channels}",
                where=f"{manifest.rows.iloc[i]['path']}", hint="set model.preprocess.in_channels to match the pool",
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
    """Small affine + intensity jitter + noise (MONAI), on channel-first tensors. No vertical flip."""
    from monai import transforms as T

    if not augment.enabled:
        return T.Compose([])
    p = augment.prob
    return T.Compose([
        *_stain_transforms(augment),
        T.RandAffine(
            prob=p, rotate_range=np.deg2rad(augment.rotate_deg), scale_range=augment.scale,
            translate_range=augment.translate * size, padding_mode="border", mode="bilinear", spatial_size=None,
        ),
        T.RandScaleIntensity(factors=augment.intensity_scale, prob=p),
        T.RandShiftIntensity(offsets=augment.intensity_shift, prob=p),
        T.RandGaussianNoise(prob=p, std=augment.noise_std),
    ])


def _stain_transforms(augment) -> list:
    """H&E stain jitter first, on the tile's own colours (RGB tiles only; off when both amounts are 0)."""
    sigma, bias = getattr(augment, "stain_sigma", 0.0), getattr(augment, "stain_bias", 0.0)
    if not (sigma or bias):
        return []
    from medtriage.data.stain_augment import RandStainAugment

    return [RandStainAugment(sigma, bias)]


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
