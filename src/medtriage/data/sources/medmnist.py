"""MedMNIST-layout npz files (`train_images`, `train_labels`, `val_...`, `test_...`) as a pool.

The npz's own splits are kept as they are, so test figures compare with the published tables.
Each image counts as its own patient: MedMNIST ships no patient ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medtriage.data.manifest import Manifest, PoolWriter
from medtriage.data.pool_folder import MANIFEST_FILE, pool_lock
from medtriage.errors import InputError
from medtriage.format import sha256_file
from medtriage.io.npz import NPZ_HINT, read_npz, require_pixels
from medtriage.io.safe_output import write_atomic

PNEUMONIA_LABELS = ["normal", "pneumonia"]
SOURCE_FILE = "source.json"  # the npz a pool was built from (its sha256): another npz at the same pool_dir rebuilds it


def as_chw(image: np.ndarray) -> np.ndarray:
    """uint8 `[H, W]` or `[H, W, 3]` -> float32 `[C, H, W]` in [0, 1]."""
    chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    return chw.astype(np.float32) / 255.0


def build_npz_pool(npz_path: str | Path, pool_dir: str | Path, label_names: list[str] | None = None, site: str = "medmnist") -> Manifest:
    """Write a pool folder from an npz, one manifest row per image, keeping the npz's splits."""
    record = {"npz": Path(npz_path).name, "sha256": _digest(npz_path)}  # before reading: an npz replaced meanwhile rebuilds
    splits = read_npz(npz_path)  # a missing or unreadable npz is refused here, naming it
    label_names = label_names or [f"class_{i}" for i in range(_class_count(splits))]
    _check_labels(splits, label_names, npz_path)
    for split, (images, _) in splits.items():
        require_pixels(images, split, npz_path)
    with pool_lock(pool_dir):
        # The record of the previous npz goes first: a build cut short after its manifest, before its own record, must
        # not leave this npz's pool looking built from that one
        (Path(pool_dir) / SOURCE_FILE).unlink(missing_ok=True)
        manifest = _write_npz_pool(splits, npz_path, pool_dir, label_names, site)
        write_atomic(Path(pool_dir) / SOURCE_FILE, json.dumps(record).encode())
    return manifest


def _write_npz_pool(splits: dict, npz_path: str | Path, pool_dir: str | Path, label_names: list[str], site: str) -> Manifest:
    with PoolWriter(pool_dir, label_names) as writer:
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


def _digest(npz_path: str | Path) -> str | None:
    try:
        return sha256_file(npz_path)
    except OSError:
        return None  # read_npz says what is wrong with the path


def _class_count(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    return max((int(labels.max()) + 1 for _, labels in splits.values() if len(labels)), default=0)


def _check_labels(splits: dict[str, tuple[np.ndarray, np.ndarray]], label_names: list[str], npz_path: str | Path) -> None:
    """Every label must index a name: a label past the names, or a negative one (which Python would count from the
    end), would put images in a class they do not belong to."""
    for split, (_, labels) in splits.items():
        bad = labels[(labels < 0) | (labels >= len(label_names))]
        if len(bad):
            raise InputError(
                f"'{split}_labels' holds label {int(bad[0])} ({len(bad)} such), but the {len(label_names)} label names "
                f"{label_names} cover only 0..{len(label_names) - 1}",
                where=npz_path,
                hint=f"set data.label_names to one name per class of this npz ({NPZ_HINT})",
            )


def npz_pool_is_current(npz_path: str | Path, pool_dir: str | Path) -> bool:
    """Whether `pool_dir` holds a pool built from this very npz (a missing npz, or a pool without its record, is not)."""
    record = Path(pool_dir) / SOURCE_FILE
    if not (Path(pool_dir) / MANIFEST_FILE).is_file() or not record.is_file() or not Path(npz_path).is_file():
        return False
    try:
        return json.loads(record.read_text()).get("sha256") == sha256_file(npz_path)
    except (ValueError, AttributeError):
        return False
