"""Resized training splits kept on disk, so a second run (or a second rank) never decodes or resizes again.

`cache_split` reads the pool's decoded pixels and applies the model's resize to every image: at
224 px on a large pool that is the slowest part of a run's start. `persistent_split` stores its
result as `<pool_dir>/resized/<key>.npy`, where the key hashes everything the result depends on
(manifest fingerprint, the split's rows after limit and holdout, preprocessing size and channels), and loads
it back on the next call. A changed pool or a different input size gets a new key; old files
can be deleted at any time. Files are written under a temporary name, flushed to disk and renamed, so a crashed
or concurrent writer (or a power loss) never leaves a half-written cache that looks valid; a file that is not
exactly what its key promises (float32, this split's image count, channels and size) is resized again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from medtriage.data.manifest import Manifest
from medtriage.data.torch.datasets import CachedSplit, cache_split, limit_rows
from medtriage.io.safe_output import write_atomic

log = logging.getLogger(__name__)

CACHE_FOLDER = "resized"
CACHE_VERSION = 1  # bump when the resize itself changes


def split_positions(manifest: Manifest, split: str, limit: int | None = None, seed: int = 0) -> np.ndarray:
    """Manifest positions of the rows `cache_split` keeps, in its order."""
    rows = limit_rows(manifest.split(split), limit, seed)
    return np.flatnonzero(manifest.rows.index.isin(rows.index))


def cache_key(manifest: Manifest, positions: np.ndarray, preprocess) -> str:
    """Hash of what the resized images depend on: pool content, which rows, and the resize."""
    spec = preprocess.spec
    digest = hashlib.sha256(
        json.dumps(
            {"v": CACHE_VERSION, "manifest": manifest.fingerprint, "size": spec.size, "in_channels": spec.in_channels}, sort_keys=True
        ).encode()
    )
    digest.update(np.ascontiguousarray(positions, dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


def cache_path(manifest: Manifest, split: str, preprocess, limit: int | None = None, seed: int = 0) -> Path:
    key = cache_key(manifest, split_positions(manifest, split, limit, seed), preprocess)
    return Path(manifest.pool_dir) / CACHE_FOLDER / f"{split}_{preprocess.spec.size}px_{key}.npy"


def persistent_split(manifest: Manifest, split: str, preprocess, limit: int | None = None, seed: int = 0) -> CachedSplit:
    """`cache_split`'s result, from disk when an earlier call stored it (identical values: float32)."""
    path = cache_path(manifest, split, preprocess, limit, seed)
    if path.is_file():
        cached = _load(manifest, split_positions(manifest, split, limit, seed), path, preprocess.spec)
        if cached is not None:
            return cached
    built = cache_split(manifest, split, preprocess, limit, seed)
    _store(built.images.numpy(), path)
    return built


def _load(manifest: Manifest, positions: np.ndarray, path: Path, spec) -> CachedSplit | None:
    """The stored split, or None when the file is unreadable or holds other than float32 `[N, C, S, S]` (rebuild it)."""
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        return None
    if images.dtype != np.float32 or images.shape != (len(positions), spec.in_channels, spec.size, spec.size):
        return None
    return CachedSplit(
        images=torch.from_numpy(np.array(images)),  # one sequential read into memory
        labels=torch.as_tensor(manifest.rows["label"].to_numpy()[positions], dtype=torch.int64),
        sites=manifest.rows["site"].astype(str).to_numpy()[positions],
        row_indices=positions,
    )


def _store(images: np.ndarray, path: Path) -> None:
    """Atomic and durable write (`write_atomic`): renamed into place only once its bytes are on disk."""
    try:
        write_atomic(path, lambda file: np.save(file, images))
    except OSError as err:  # a read-only pool still trains; it just resizes again next time
        log.warning("could not store the resized split at %s (%s): the next run resizes again", path, err)
