"""An npz pool remembers which npz it was built from: pointing `data.npz_path` at another file rebuilds it, and a
missing npz is an error naming it, not a silent reuse of whatever pool sits in `data.pool_dir`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medtriage.data.sources import medmnist
from medtriage.data.sources.registry import build_pool
from medtriage.errors import DataNotFoundError

LABELS = ["normal", "pneumonia"]


def write_npz(path: Path, per_split: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (per_split, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(per_split) % 2)[:, None]
    np.savez(path, **arrays)
    return path


def data(npz: Path, pool_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(source="npz", npz_path=str(npz), pool_dir=str(pool_dir), label_names=LABELS)


def test_another_npz_at_the_same_pool_dir_rebuilds_the_pool(tmp_path):
    first, second = write_npz(tmp_path / "a.npz", 4, 0), write_npz(tmp_path / "b.npz", 6, 1)
    pool = tmp_path / "pool"
    assert len(build_pool(data(first, pool)).rows) == 12
    assert len(build_pool(data(first, pool)).rows) == 12  # the same npz: reused
    rebuilt = build_pool(data(second, pool))
    assert len(rebuilt.rows) == 18 and rebuilt.rows["path"].str.startswith("b.npz#").all()
    write_npz(second, 5, 2)  # the same name, other content
    assert len(build_pool(data(second, pool)).rows) == 15


def test_a_missing_npz_is_an_error_even_when_a_pool_is_there(tmp_path):
    pool = tmp_path / "pool"
    build_pool(data(write_npz(tmp_path / "a.npz", 4, 0), pool))
    with pytest.raises(DataNotFoundError) as err:
        build_pool(data(tmp_path / "gone.npz", pool))
    assert "gone.npz" in str(err.value)


def test_a_rebuild_cut_short_before_it_records_its_npz_is_not_taken_for_the_previous_npz_pool(tmp_path, monkeypatch):
    first, second = write_npz(tmp_path / "a.npz", 4, 0), write_npz(tmp_path / "b.npz", 6, 1)
    pool = tmp_path / "pool"
    build_pool(data(first, pool))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    write_atomic = medmnist.write_atomic
    monkeypatch.setattr(medmnist, "write_atomic", disk_full)  # b's pool is in place, its record of b.npz is not
    with pytest.raises(OSError):
        build_pool(data(second, pool))
    monkeypatch.setattr(medmnist, "write_atomic", write_atomic)
    rebuilt = build_pool(data(first, pool))
    assert len(rebuilt.rows) == 12 and rebuilt.rows["path"].str.startswith("a.npz#").all()  # not b's 18 images as a's
