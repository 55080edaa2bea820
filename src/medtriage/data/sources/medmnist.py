"""MedMNIST-layout npz files (`train_images`, `train_labels`, `val_...`, `test_...`) as a pool.

The npz's own splits are kept as they are, so test figures compare with the published tables.
Each image counts as its own patient: MedMNIST ships no patient ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medtriage.data.manifest import MANIFEST_FILE, Manifest, PoolWriter
from medtriage.format import sha256_file
from medtriage.io.npz import read_npz
from medtriage.io.safe_output import write_atomic

PNEUMONIA_LABELS = ["normal", "pneumonia"]
SOURCE_FILE = "source.json"  # the npz a pool was built from (its sha256): another npz at the same pool_dir rebuilds it


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
    manifest = writer.close()
    write_atomic(Path(pool_dir) / SOURCE_FILE, json.dumps({"npz": Path(npz_path).name, "sha256": sha256_file(npz_path)}).encode())
    return manifest


def npz_pool_is_current(npz_path: str | Path, pool_dir: str | Path) -> bool:
    """Whether `pool_dir` holds a pool built from this very npz (a missing npz, or a pool without its record, is not)."""
    record = Path(pool_dir) / SOURCE_FILE
    if not (Path(pool_dir) / MANIFEST_FILE).is_file() or not record.is_file() or not Path(npz_path).is_file():
        return False
    try:
        return json.loads(record.read_text()).get("sha256") == sha256_file(npz_path)
    except (ValueError, AttributeError):
        return False
