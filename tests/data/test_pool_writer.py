"""PoolWriter writes a pool all or nothing: a reader during a build finds no pool (or the previous one whole), and a
second build of the same pool started meanwhile does not spoil the first."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.data import manifest as manifest_module
from medtriage.data.manifest import PoolWriter, load_manifest
from medtriage.data.pool_folder import LOCK_FILE, MANIFEST_FILE, PIXELS_FILE
from medtriage.errors import DataNotFoundError


def image(value: float) -> np.ndarray:
    return np.full((1, 64, 64), value, dtype=np.float32)  # 16 KiB: larger than a file buffer, so each add reaches the disk


def add(writer: PoolWriter, value: float) -> None:
    uid = f"img-{value}"
    writer.add(image(value), site="a", patient_id=uid, study_uid=uid, series_uid=uid, sop_uid=uid, path=uid, label=0, split="train")


def test_a_pool_in_the_making_is_not_there_to_read(tmp_path):
    writer = PoolWriter(tmp_path, ["normal", "pneumonia"])
    add(writer, 0.25)
    assert not (tmp_path / PIXELS_FILE).exists() and not (tmp_path / MANIFEST_FILE).exists()
    with pytest.raises(DataNotFoundError):
        load_manifest(tmp_path)
    manifest = writer.close()
    assert np.array_equal(manifest.image(0), image(0.25))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [LOCK_FILE]  # no temporary file left behind


def test_a_second_build_started_meanwhile_does_not_spoil_the_first(tmp_path):
    first = PoolWriter(tmp_path, ["normal", "pneumonia"])
    add(first, 0.25)
    second = PoolWriter(tmp_path, ["normal", "pneumonia"])  # e.g. another training on the same new pool
    add(first, 0.5)
    add(second, 0.75)
    manifest = first.close()
    assert [manifest.image(i)[0, 0, 0] for i in range(2)] == [0.25, 0.5]
    assert second.close().image(0)[0, 0, 0] == 0.75  # the last build to finish is the pool, whole


def test_a_rebuild_that_fails_before_its_manifest_leaves_no_pool_not_old_rows_over_new_pixels(tmp_path, monkeypatch):
    old = PoolWriter(tmp_path, ["normal", "pneumonia"])
    add(old, 0.25)
    add(old, 0.5)
    old.close()
    new = PoolWriter(tmp_path, ["normal", "pneumonia"])
    add(new, 0.75)
    add(new, 1.0)

    def disk_full(path, columns, rows):
        if path.name == MANIFEST_FILE:
            raise OSError(28, "No space left on device")
        return write_csv_atomic(path, columns, rows)

    write_csv_atomic = manifest_module.write_csv_atomic
    monkeypatch.setattr(manifest_module, "write_csv_atomic", disk_full)
    with pytest.raises(OSError):
        new.close()
    with pytest.raises(DataNotFoundError, match="build it first"):  # not image 0.25 read as 0.75
        load_manifest(tmp_path)


def test_a_build_that_fails_leaves_no_hidden_pixel_file_behind(tmp_path, monkeypatch):
    """Its pixels are as large as the pool: each failed build used to leave its `.partial` file in the folder."""
    from medtriage.data.sources import medmnist
    from tests.data.test_npz_pool_source import write_npz

    with pytest.raises(RuntimeError, match="decoding failed"), PoolWriter(tmp_path / "pool", ["normal", "pneumonia"]) as writer:
        add(writer, 0.25)
        raise RuntimeError("decoding failed")
    assert [p.name for p in (tmp_path / "pool").iterdir()] == []

    real_as_chw, seen = medmnist.as_chw, []

    def fails_on_the_third(image):
        seen.append(image)
        if len(seen) == 3:
            raise MemoryError("out of memory")
        return real_as_chw(image)

    monkeypatch.setattr(medmnist, "as_chw", fails_on_the_third)
    with pytest.raises(MemoryError):
        medmnist.build_npz_pool(write_npz(tmp_path / "a.npz", 4, 0), tmp_path / "npz-pool", ["normal", "pneumonia"])
    assert [p.name for p in (tmp_path / "npz-pool").iterdir()] == [LOCK_FILE]
