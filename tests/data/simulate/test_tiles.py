"""Synthetic multi-site tile pools and pools cut from the real CMU-1 slide."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medtriage.data.manifest import load_manifest
from medtriage.data.simulate.tiles import (
    SYNTHETIC_SITES,
    TILE_LABELS,
    SyntheticTilesConfig,
    build_slide_pool,
    build_synthetic_tile_pool,
    draw_tile,
    patient_splits,
    read_tile_info,
)
from medtriage.errors import InputError

ROOT = Path(__file__).resolve().parents[3]
CMU1 = ROOT / "data" / "samples" / "CMU-1-Small-Region.svs"
SMALL = dict(patients_per_site=10, tiles_per_slide=6, tile_size=48)


@pytest.fixture(scope="module")
def raw_pool(tmp_path_factory):
    return build_synthetic_tile_pool(tmp_path_factory.mktemp("raw"), SyntheticTilesConfig(**SMALL))


@pytest.fixture(scope="module")
def normalized_pool(tmp_path_factory):
    return build_synthetic_tile_pool(tmp_path_factory.mktemp("norm"), SyntheticTilesConfig(**SMALL, stain_normalize=True))


def site_mean_colours(pool) -> np.ndarray:
    """Mean RGB per site, one row per site."""
    colours = []
    for site in pool.sites:
        idx = np.flatnonzero(pool.rows["site"].to_numpy() == site)
        colours.append(np.mean([pool.image(int(i)).mean(axis=(1, 2)) for i in idx], axis=0))
    return np.array(colours)


def test_pool_layout(raw_pool):
    rows = raw_pool.rows
    assert raw_pool.label_names == TILE_LABELS
    assert len(rows) == len(SYNTHETIC_SITES) * 10 * 6 and len(raw_pool.rejects) == 0
    assert set(raw_pool.sites) == set(SYNTHETIC_SITES) and all(s.startswith("synthetic_") for s in raw_pool.sites)
    image = raw_pool.image(0)
    assert image.shape == (3, 48, 48) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    for column in ("slide_id", "x", "y", "tile_mpp", "tissue_fraction", "slide_label"):
        assert column in rows
    info = read_tile_info(raw_pool.pool_dir)
    assert info["tile_size"] == 48 and info["stain_normalization"] is None and info["tile_mpp"] > 0


def test_splits_are_per_patient_and_see_both_labels(raw_pool):
    rows = raw_pool.rows
    assert (rows.groupby("patient_id")["split"].nunique() == 1).all()
    for split in ("train", "val", "test"):
        assert set(rows[rows["split"] == split]["label"]) == {0, 1}
    normal_slides = rows[rows["slide_label"] == 0]
    assert (normal_slides["label"] == 0).all()  # a normal slide has no tumour tiles


def test_patient_splits_are_stratified_and_repeatable():
    patients = [(site, f"{site}-p{i}", i % 2) for site in ("a", "b") for i in range(20)]
    first, again = patient_splits(patients, seed=3), patient_splits(patients, seed=3)
    assert first == again and first != patient_splits(patients, seed=4)
    labels = {(site, p): label for site, p, label in patients}
    for split in ("val", "test"):
        assert {labels[p] for p, s in first.items() if s == split} == {0, 1}


def test_one_patient_id_at_two_sites_is_two_patients_each_with_its_split():
    """Before, the second site's patient overwrote the first's split: held out, site b's p7 sent site a's p7 to test."""
    patients = [(site, f"p{i}", i % 2) for site in ("a", "b") for i in range(20)]
    splits = patient_splits(patients, seed=3, holdout_site="b")
    assert len(splits) == 40 and {s for (site, _), s in splits.items() if site == "b"} == {"test"}
    assert {s for (site, _), s in splits.items() if site == "a"} == {"train", "val"}


def test_held_out_site_is_all_test_and_nowhere_else(tmp_path):
    pool = build_synthetic_tile_pool(tmp_path, SyntheticTilesConfig(**SMALL, holdout_site="synthetic_site_b"))
    rows = pool.rows
    assert set(rows[rows["split"] == "test"]["site"]) == {"synthetic_site_b"}
    assert set(rows[rows["site"] == "synthetic_site_b"]["split"]) == {"test"}
    assert {"train", "val"} <= set(rows["split"])


def test_a_rebuild_cut_short_before_its_record_is_not_reused_for_the_previous_settings(tmp_path, monkeypatch):
    from medtriage.data.simulate import tiles

    first = SyntheticTilesConfig(**SMALL)
    tiles.ensure_synthetic_tile_pool(tmp_path, first)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(tiles, "write_tile_info", disk_full)
        with pytest.raises(OSError):
            tiles.ensure_synthetic_tile_pool(tmp_path, SyntheticTilesConfig(**{**SMALL, "patients_per_site": 4}))
    again = tiles.ensure_synthetic_tile_pool(tmp_path, first)  # built again: the pool on disk holds the other settings'
    assert len(again.rows) == len(build_synthetic_tile_pool(tmp_path / "fresh", first).rows)
    assert read_tile_info(tmp_path)["synthetic"]["patients_per_site"] == SMALL["patients_per_site"]


def test_sites_look_different_and_normalisation_brings_them_together(raw_pool, normalized_pool):
    spread_raw = np.ptp(site_mean_colours(raw_pool), axis=0).max()
    spread_norm = np.ptp(site_mean_colours(normalized_pool), axis=0).max()
    assert spread_raw > 0.08
    assert spread_norm < spread_raw / 2
    assert read_tile_info(normalized_pool.pool_dir)["stain_normalization"] == "macenko"


def test_tumour_tiles_differ_learnably_from_normal_tiles():
    """Haematoxylin-dark pixel fraction alone separates the classes well, but not perfectly."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    tiles = [draw_tile(rng, 64, bool(y), SYNTHETIC_SITES["synthetic_site_a"]) for y in labels]
    dark = [float((t.mean(axis=0) < 0.5).mean()) for t in tiles]
    auc = roc_auc_score(labels, dark)
    assert 0.75 < auc < 0.999


def test_unknown_site_is_refused(tmp_path):
    with pytest.raises(InputError, match="unknown synthetic sites"):
        build_synthetic_tile_pool(tmp_path, SyntheticTilesConfig(sites=["hospital_x"]))


def test_real_slide_pool_records_coordinates_and_rejects(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    slides = [
        {"path": str(CMU1), "site": "cmu", "patient_id": "cmu-1", "label": 0, "split": "test"},
        {"path": str(bad), "site": "cmu", "patient_id": "cmu-2", "label": 1, "split": "test"},
    ]
    pool = build_slide_pool(slides, tmp_path / "pool", tile_size=112, mpp=0.5, stain_normalize=True)
    assert len(pool.rejects) == 1 and "not a readable" in pool.rejects.iloc[0]["reason"]
    rows = pool.rows
    assert len(rows) > 20 and set(rows["patient_id"]) == {"cmu-1"}
    assert (rows["tissue_fraction"] >= 0.5).all() and rows["x"].nunique() > 2
    assert rows["sop_uid"].is_unique
    again = load_manifest(tmp_path / "pool")
    assert again.image(3).shape == (3, 112, 112)


def test_a_slide_pool_shows_its_progress_tile_by_tile(tmp_path, monkeypatch, capsys):
    """A pool of one or two large slides takes minutes: a bar that moves only between slides looks stuck."""
    from medtriage import progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line per tile, however fast the tiles come
    slides = [{"path": str(CMU1), "site": "cmu", "patient_id": "cmu-1", "label": 0, "split": "test"}]
    pool = build_slide_pool(slides, tmp_path / "pool", tile_size=112, mpp=0.5)
    drawn = re.findall(rf"{re.escape(CMU1.name)}: (\d+)/(\d+) ", capsys.readouterr().err)
    counts = [int(done) for done, _ in drawn]
    assert {int(total) for _, total in drawn} == {len(pool.rows)} and len(pool.rows) > 20
    assert counts == sorted(counts) and counts[-1] == len(pool.rows) and len(set(counts)) > 2


def test_pool_info_says_how_to_serve_its_tiles(raw_pool):
    info = read_tile_info(raw_pool.pool_dir)
    assert info["min_tissue"] == 0.5 and info["source"] == "synthetic" and info["target_stains"] is None


# --- stain augmentation in the training transforms ---------------------------------------------


def augment_config(**changes):
    from medtriage.config import AugmentConfig

    return AugmentConfig(**{"prob": 0.0, **changes})  # prob 0: only the stain jitter acts


def test_stain_augmentation_is_off_unless_asked():
    from medtriage.data.torch.datasets import train_transforms
    from medtriage.data.torch.stain_augment import RandStainAugment

    assert not any(isinstance(t, RandStainAugment) for t in train_transforms(augment_config(), 48).transforms)
    first = train_transforms(augment_config(stain_sigma=0.3, stain_bias=0.1), 48).transforms[0]
    assert isinstance(first, RandStainAugment) and (first.sigma, first.bias) == (0.3, 0.1)


def test_stain_augmentation_changes_colour_not_layout_and_repeats_with_its_seed(raw_pool):
    import torch

    from medtriage.data.torch.datasets import train_transforms

    tile = torch.from_numpy(raw_pool.image(0))
    transforms = train_transforms(augment_config(stain_sigma=0.3, stain_bias=0.1), 48)
    outputs = []
    for _ in range(2):
        transforms.set_random_state(seed=7)
        outputs.append([torch.as_tensor(transforms(tile)) for _ in range(3)])
    first, again = outputs
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    for out in first:
        assert out.shape == tile.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
        assert (out.mean(dim=(1, 2)) - tile.mean(dim=(1, 2))).abs().max() > 1e-3  # colour moved
        # where the nuclei are stays put: the darkest pixels of the tile are still among the darkest
        dark = tile.mean(dim=0) < tile.mean(dim=0).quantile(0.1)
        assert out.mean(dim=0)[dark].mean() < out.mean(dim=0)[~dark].mean()


def test_stain_augmentation_refuses_grey_images():
    import torch

    from medtriage.data.torch.stain_augment import RandStainAugment
    from medtriage.errors import ConfigError

    with pytest.raises(ConfigError, match="RGB tiles"):
        RandStainAugment(0.1, 0.1)(torch.rand(1, 16, 16))
    with pytest.raises(ConfigError):
        RandStainAugment(-0.1, 0.0)
