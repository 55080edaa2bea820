"""Pool sources given inputs they cannot use: labels outside the class names, npz files that are not grey-scale
two-class X-rays, and a tile pool whose rebuild fails or whose settings record is damaged."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medtriage.config.schema import SyntheticTilesConfig
from medtriage.data.manifest import REJECTS_FILE
from medtriage.data.simulate.sites import make_sites
from medtriage.data.simulate.tiles import TILE_INFO_FILE, ensure_synthetic_tile_pool, read_tile_info
from medtriage.data.sources.registry import build_pool
from medtriage.errors import InputError

LABELS = ["normal", "pneumonia"]


def write_npz(path: Path, labels: list[int], image_shape: tuple[int, ...] = (8, 8)) -> Path:
    """Every split holds one distinct image per label."""
    arrays = {}
    for split in ("train", "val", "test"):
        fill = np.arange(len(labels), dtype=np.uint8).reshape(-1, *[1] * len(image_shape))
        arrays[f"{split}_images"] = np.broadcast_to(fill, (len(labels), *image_shape)).copy()
        arrays[f"{split}_labels"] = np.asarray(labels)[:, None]
    np.savez(path, **arrays)
    return path


def npz_data(npz: Path, pool_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(source="npz", npz_path=str(npz), pool_dir=str(pool_dir), label_names=LABELS)


@pytest.mark.parametrize("bad_label", [2, -1], ids=["past_the_names", "negative"])
def test_npz_label_outside_the_label_names_is_refused_before_a_pool_is_written(tmp_path, bad_label):
    npz = write_npz(tmp_path / "set.npz", [0, 1, bad_label, 1])
    with pytest.raises(InputError) as err:
        build_pool(npz_data(npz, tmp_path / "pool"))
    assert f"label {bad_label}" in str(err.value) and "set.npz" in str(err.value)
    assert not (tmp_path / "pool" / "manifest.csv").exists()


def test_npz_labels_within_the_names_still_build(tmp_path):
    manifest = build_pool(npz_data(write_npz(tmp_path / "set.npz", [0, 1, 1, 0]), tmp_path / "pool"))
    assert sorted(manifest.rows["label"].unique()) == [0, 1] and len(manifest.rows) == 12


@pytest.mark.parametrize(
    ("labels", "image_shape", "message"),
    [([0, 1, -1, 1], (8, 8), "label -1"), ([0, 1, 2, 1], (8, 8), "label 2"), ([0, 1, 0, 1], (8, 8, 3), "grey-scale")],
    ids=["negative_label", "third_class", "colour_images"],
)
def test_site_simulator_refuses_an_npz_it_cannot_label_or_draw(tmp_path, labels, image_shape, message):
    npz = write_npz(tmp_path / "other.npz", labels, image_shape)
    with pytest.raises(InputError) as err:
        make_sites(npz, tmp_path / "sites", seed=0, limit=4)
    assert message in str(err.value) and "other.npz" in str(err.value)
    assert not (tmp_path / "sites").exists()


def tiny_tiles(patients_per_site: int) -> SyntheticTilesConfig:
    return SyntheticTilesConfig(
        sites=SyntheticTilesConfig().sites[:1], patients_per_site=patients_per_site, tiles_per_slide=2, tile_size=16
    )


def test_tile_pool_whose_rebuild_failed_is_not_reused_as_the_new_one(tmp_path):
    pool, first, second = tmp_path / "pool", tiny_tiles(2), tiny_tiles(3)
    assert len(ensure_synthetic_tile_pool(pool, first).rows) == 4
    (pool / REJECTS_FILE).unlink()
    (pool / REJECTS_FILE).mkdir()  # the rebuild cannot finish writing the pool
    with pytest.raises(OSError):
        ensure_synthetic_tile_pool(pool, second)
    (pool / REJECTS_FILE).rmdir()
    assert len(ensure_synthetic_tile_pool(pool, second).rows) == 6


def test_damaged_tile_settings_rebuild_the_pool_and_read_as_a_clear_error(tmp_path):
    pool, config = tmp_path / "pool", tiny_tiles(2)
    ensure_synthetic_tile_pool(pool, config)
    (pool / TILE_INFO_FILE).write_text('{"tile_size": 1')  # cut short
    with pytest.raises(InputError, match="tile settings"):
        read_tile_info(pool)
    assert len(ensure_synthetic_tile_pool(pool, config).rows) == 4
    assert read_tile_info(pool)["synthetic"]["patients_per_site"] == 2
