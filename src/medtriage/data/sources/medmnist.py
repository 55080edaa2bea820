"""MedMNIST-layout npz files (`train_images`, `train_labels`, `val_...`, `test_...`) as a pool.

The npz's own splits are kept as they are, so test figures compare with the published tables.
Each image counts as its own patient: MedMNIST ships no patient ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtriage.data.manifest import Manifest, PoolWriter
from medtriage.io.npz import read_npz

PNEUMONIA_LABELS = ["normal", "pneumonia"]


def as_chw(image: np.ndarray) -> np.ndarray:
    """uint8 `[H, W]` or `[H, W, 3]` -> float32 `[C, H, W]` in [0, 1]."""
    chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    return chw.astype(np.float32) / 255.0


def build_npz_pool(npz_path: str | Path, pool_dir: str | Path, label_names: list[str] | None = None, site: str = "medmnist") -> Manifest:
    """Write a pool folder from an npz, one manifest row per image, keeping the npz's splits."""
    splits = read_npz(npz_path)
    n_classes = int(max(labels.max() for _, labels in splits.values())) + 1
    writer = PoolWriter(pool_dir, label_names or [f"class_{i}" for i in range(n_classes)])
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            uid = f"{split}-{i:05d}"
            writer.add(
                as_chw(image),
                site=site,
                patient_id=uid,
                study_uid=uid,
                series_uid=uid,
                sop_uid=uid,
                path=f"{Path(npz_path).name}#{split}_images[{i}]",
                label=int(label),
                split=split,
            )
    return writer.close()
