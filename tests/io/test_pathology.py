"""Whole-slide reading, tissue mask, tile grid and stain normalisation on the real CMU-1 crop and made-up slides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medtriage.errors import DataNotFoundError, InputError
from medtriage.io.pathology import (
    iter_tile_batches, open_slide, otsu_threshold, prepare_slide, read_tile, tile_grid, tissue_mask,
)
from medtriage.io.stain import REFERENCE_STAINS, StainNormalizer, augment_stain, fit_stains

ROOT = Path(__file__).resolve().parents[2]
CMU1 = ROOT / "data" / "samples" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def slide():
    with open_slide(CMU1) as opened:
        yield opened


@pytest.fixture(scope="module")
def mask(slide):
    return tissue_mask(slide)


def write_tiff(path: Path, image: np.ndarray, mpp: float | None = 0.5) -> Path:
    """A single-level tiled RGB TIFF, with or without a resolution tag."""
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib", **resolution)
    return path


def test_reads_svs_metadata(slide):
    assert slide.dimensions == (2220, 2967)
    assert slide.mpp == pytest.approx(0.499)
    assert slide.level_count >= 1


def test_fast_reader_matches_tiffslide_inside_the_slide(slide):
    import tiffslide

    reference = tiffslide.TiffSlide(CMU1)
    for x, y, w, h in [(0, 0, 224, 224), (123, 457, 500, 300), (1900, 2700, 320, 267)]:
        ours = slide.read_region(x, y, 0, (w, h))
        theirs = np.asarray(reference.read_region((x, y), 0, (w, h), as_array=True))[..., :3]
        np.testing.assert_array_equal(ours, theirs)


def test_outside_the_slide_reads_as_white_background(slide):
    region = slide.read_region(2100, 2900, 0, (300, 200))
    assert region.shape == (200, 300, 3)
    assert (region[100:, :, :] == 255).all() and (region[:, 150:, :] == 255).all()


def test_otsu_splits_two_populations():
    values = np.concatenate([np.full(500, 0.1), np.full(300, 0.6)])
    assert 0.1 <= otsu_threshold(values) < 0.6


def test_tissue_mask_finds_the_tissue_not_the_glass(slide, mask):
    assert 0.15 < mask.mask.mean() < 0.6  # the crop is about one third tissue
    thumb = slide.thumbnail(max(mask.mask.shape))
    brightness = np.asarray(thumb, np.float32).mean(axis=-1)
    h, w = min(thumb.shape[0], mask.mask.shape[0]), min(thumb.shape[1], mask.mask.shape[1])
    tissue, glass = brightness[:h, :w][mask.mask[:h, :w]], brightness[:h, :w][~mask.mask[:h, :w]]
    assert tissue.mean() < glass.mean() - 30


def test_tile_grid_is_physical_and_skips_background(slide, mask):
    grid = tile_grid(slide, tile_size=112, mpp=0.5, mask=mask, min_tissue=0.5)
    assert grid.size0 == pytest.approx(112 * 0.5 / 0.499)
    assert 0 < len(grid.tiles) < grid.n_candidates
    assert all(t.tissue_fraction >= 0.5 for t in grid.tiles)
    coarse = tile_grid(slide, tile_size=56, mpp=1.0, mask=mask, min_tissue=0.5)  # same µm per tile
    assert coarse.size0 == pytest.approx(grid.size0) and coarse.read_size == 112
    assert read_tile(slide.reader(), coarse, coarse.tiles[0]).shape == (3, 56, 56)


def test_tiles_keep_the_model_input_contract(slide, mask):
    grid = tile_grid(slide, tile_size=224, mpp=0.5, mask=mask)
    tile = read_tile(slide.reader(), grid, grid.tiles[0])
    assert tile.dtype == np.float32 and tile.shape == (3, 224, 224)
    assert 0.0 <= tile.min() and tile.max() <= 1.0


def test_slide_finer_than_scan_is_refused(slide, mask):
    with pytest.raises(InputError, match="coarser"):
        tile_grid(slide, tile_size=224, mpp=0.25, mask=mask)


def test_stain_normalisation_moves_slide_stains_to_the_reference(slide, mask):
    grid = tile_grid(slide, tile_size=224, mpp=0.5, mask=mask)
    reader = slide.reader()
    tiles = [read_tile(reader, grid, t) for t in grid.tiles[:12]]
    source = fit_stains(tiles)
    assert source.matrix[0, 0] > source.matrix[0, 1]  # haematoxylin (absorbs red) first
    restained = [StainNormalizer(source)(t) for t in tiles]
    refit = fit_stains(restained)
    before = np.abs(source.matrix - REFERENCE_STAINS.matrix).max()
    after = np.abs(refit.matrix - REFERENCE_STAINS.matrix).max()
    assert after < 0.1 and after < before / 2
    assert restained[0].dtype == np.float32 and restained[0].shape == tiles[0].shape


def test_stain_fit_refuses_blank_tiles():
    with pytest.raises(InputError, match="too little stained tissue"):
        fit_stains(np.full((3, 64, 64), 0.95, np.float32))


def test_stain_augmentation_is_identity_at_zero_and_varies_otherwise(slide, mask):
    grid = tile_grid(slide, tile_size=112, mpp=0.5, mask=mask)
    tile = read_tile(slide.reader(), grid, grid.tiles[0])
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(augment_stain(tile, rng, sigma=0, bias=0), tile, atol=1.01 / 255)  # black clips to 1/255
    a, b = augment_stain(tile, rng, 0.2, 0.2), augment_stain(tile, rng, 0.2, 0.2)
    assert np.abs(a - b).mean() > 0.005 and a.shape == tile.shape and a.dtype == np.float32


def test_tile_batches_are_the_same_with_threads():
    prepared = prepare_slide(CMU1, tile_size=112, mpp=0.5, stain_normalize=True)
    with prepared.slide:
        single = np.concatenate([b for _, b in iter_tile_batches(prepared, batch_size=8, workers=1)])
        threaded = np.concatenate([b for _, b in iter_tile_batches(prepared, batch_size=8, workers=2)])
    assert single.shape == (len(prepared.grid.tiles), 3, 112, 112)
    np.testing.assert_array_equal(single, threaded)


# --- bad input -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataNotFoundError):
        open_slide(tmp_path / "nope.svs")


def test_non_slide_file(tmp_path):
    path = tmp_path / "report.svs"
    path.write_text("this is a pathology report, not an image")
    with pytest.raises(InputError, match="not a readable whole-slide image"):
        open_slide(path)


@pytest.mark.parametrize("fraction", [0.5, 0.05])
def test_truncated_svs(tmp_path, fraction):
    data = CMU1.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputError, match="truncated"):
        open_slide(path)


def test_truncated_tile_data_is_named_as_such(tmp_path):
    rng = np.random.default_rng(0)
    path = write_tiff(tmp_path / "whole.tif", rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
    with tifffile.TiffFile(path) as tif:  # tifffile writes the header first: cut into the last tile
        page = tif.pages[0]
        cut = page.dataoffsets[-1] + page.databytecounts[-1] // 2
    cut_path = tmp_path / "cut.tif"
    cut_path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(InputError, match="truncated slide"):
        open_slide(cut_path)


def test_blank_slide_has_no_tissue(tmp_path):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(235, 3, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    path = write_tiff(tmp_path / "blank.tif", glass)
    with pytest.raises(InputError, match="no tissue found"):
        prepare_slide(path, tile_size=224, mpp=0.5)


def test_missing_resolution_needs_an_explicit_mpp(tmp_path):
    with open_slide(CMU1) as real:
        region = real.read_region(0, 1500, 0, (1024, 1024))
    path = write_tiff(tmp_path / "nores.tif", region, mpp=None)
    with pytest.raises(InputError, match="no resolution metadata") as err:
        open_slide(path)
    assert "--mpp" in str(err.value)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5
    assert len(prepare_slide(path, tile_size=224, mpp=0.5, slide_mpp=0.5).grid.tiles) > 0


def test_io_pathology_imports_without_torch():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'monai', 'mlflow', 'hydra'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from medtriage.io.pathology import prepare_slide\n"
        "import medtriage.serve.slides\n"
        f"print(len(prepare_slide({str(CMU1)!r}, 224, 0.5, stain_normalize=True).grid.tiles))\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 10
