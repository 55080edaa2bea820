"""MedMNIST-layout npz files (`train_images`, `train_labels`, `val_...`, `test_...`) as a pool.

The npz's own splits are kept as they are, so test figures compare with the published tables.
Each image counts as its own patient: MedMNIST ships no patient ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtriage.data.manifest import SPLITS, Manifest, PoolWriter
from medtriage.errors import DataNotFoundError, InputError

PNEUMONIA_LABELS = ["normal", "pneumonia"]


def read_npz(npz_path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split name -> (images uint8 `[N, H, W]` or `[N, H, W, 3]`, labels int64 `[N]`)."""
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise DataNotFoundError("MedMNIST npz not found", where=npz_path, hint="the bundled copy is data/samples/pneumoniamnist_28.npz")
    with np.load(npz_path) as data:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in data]
        if missing:
            raise InputError(f"not a MedMNIST npz: missing keys {missing}", where=npz_path)
        return {s: (data[f"{s}_images"], data[f"{s}_labels"].reshape(-1).astype(np.int64)) for s in SPLITS}


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
