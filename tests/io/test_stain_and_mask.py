"""Stain fits on samples without two stains, and the tissue mask's integral image (exact, int32, no big temporaries)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medtriage.data.simulate.tiles import SiteStain, draw_tile
from medtriage.errors import InputError
from medtriage.io.pathology import TissueMask, integral_dtype, open_slide, prepare_slide, tile_grid, tissue_mask
from medtriage.io.slide_reader import MAX_WHOLE_IMAGE_BYTES
from medtriage.io.stain import MIN_STAIN_ANGLE_DEGREES, fit_stains, stain_angle_degrees

CMU1 = Path(__file__).resolve().parents[2] / "data" / "samples" / "CMU-1-Small-Region.svs"


def flat(colour: tuple[int, int, int], noise: int = 0) -> np.ndarray:
    """A uint8 `[64, 64, 3]` tile of one colour, with up to `noise` codes of per-pixel jitter."""
    jitter = np.random.default_rng(0).integers(-noise, noise + 1, (64, 64, 3))
    return np.clip(np.array(colour) + jitter, 0, 255).astype(np.uint8)


# --- stain fit ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tiles",
    [flat((0, 0, 0)), flat((200, 120, 180)), flat((205, 205, 205)), [flat((200, 120, 180), noise=1)] * 3],
    ids=["black", "pink", "faint grey", "pink with noise"],
)
def test_stain_fit_refuses_a_single_flat_colour(tiles):
    with pytest.raises(InputError, match="degenerate stain fit") as refused:
        fit_stains(tiles, where="slide.svs")
    message = str(refused.value)
    assert message.startswith("slide.svs: ") and "haematoxylin [" in message and "apart" in message
    assert "turn stain normalisation off" in message


def test_stain_fit_on_real_tissue_finds_two_distinct_stains():
    with open_slide(CMU1) as slide:
        grid = tile_grid(slide, tile_size=224, mpp=0.5)
        tiles = [slide.read_region(t.x, t.y, grid.level, (224, 224)) for t in grid.tiles[::4]]
    assert stain_angle_degrees(fit_stains(tiles).matrix) > 4 * MIN_STAIN_ANGLE_DEGREES


def test_stain_fit_orients_an_eosin_without_red_towards_the_tissue():
    """Eosin barely absorbs red: an eosin-like eigenvector can point into the tissue with a slightly negative red
    component. Flipped by that sign, the eosin angles wrapped at ±π and both fitted stains came out eosin."""
    stain = SiteStain((0.77, 0.58, 0.26), (0.02, 0.71, 0.68), h_strength=0.75, e_strength=1.36, background=0.97)
    rng = np.random.default_rng(21)  # one of the samples the red-sign orientation fitted as two copies of eosin
    fitted = fit_stains([draw_tile(rng, 48, True, stain) for _ in range(6)]).matrix
    true = np.array([stain.haematoxylin, stain.eosin]).T
    true /= np.linalg.norm(true, axis=0)
    assert np.degrees(np.arccos(np.clip(np.sum(fitted * true, axis=0), -1, 1))).max() < 10


# --- tissue mask integral image -------------------------------------------------------------


def window_means(mask: TissueMask, xs: list[int], ys: list[int], size0: float) -> np.ndarray:
    """The fractions the textbook way: the mean of each window of mask cells, cut out one by one."""
    d, dy, (h, w) = mask.downsample, mask.row_downsample, mask.mask.shape
    out = np.zeros((len(ys), len(xs)))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            r0, c0 = min(int(y / dy), h), min(int(x / d), w)
            r1, c1 = (
                min(max(int(np.ceil((y + size0) / dy)), int(y / dy) + 1), h),
                min(max(int(np.ceil((x + size0) / d)), int(x / d) + 1), w),
            )
            window = mask.mask[r0:r1, c0:c1]
            out[i, j] = window.mean() if window.size else 0.0
    return out


def test_integral_image_and_fractions_match_the_reference_on_a_real_slide():
    with open_slide(CMU1) as slide:
        mask = tissue_mask(slide)
    reference = np.zeros((mask.mask.shape[0] + 1, mask.mask.shape[1] + 1), np.int64)
    reference[1:, 1:] = mask.mask.cumsum(axis=0).cumsum(axis=1)
    np.testing.assert_array_equal(mask.integral_image(), reference)
    xs, ys = list(range(0, 2300, 150)), list(range(0, 3000, 170))
    np.testing.assert_array_equal(mask.fractions(xs, ys, 224.0), window_means(mask, xs, ys, 224.0))


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (41, 1), (53, 67)])
def test_fractions_match_the_window_means_on_generated_masks(shape):
    mask = TissueMask(np.random.default_rng(shape[0]).random(shape) > 0.4, downsample=4.0, threshold=0.1)
    xs, ys = list(range(0, 4 * shape[1] + 20, 13)), list(range(0, 4 * shape[0] + 20, 11))
    np.testing.assert_array_equal(mask.fractions(xs, ys, 30.0), window_means(mask, xs, ys, 30.0))


def test_fractions_use_the_row_downsample_down_the_slide():
    """A mask whose image is not the slide's aspect: its rows cover more level-0 pixels than its columns."""
    mask = TissueMask(np.zeros((50, 100), bool), downsample=10.0, threshold=0.1, row_downsample=20.0)
    mask.mask[25:] = True  # the bottom half of the slide (level-0 rows 500 to 1000) is tissue
    fractions = mask.fractions([0, 500], [100, 600], 100.0)
    np.testing.assert_array_equal(fractions, [[0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_array_equal(fractions, window_means(mask, [0, 500], [100, 600], 100.0))


def test_integral_image_needs_no_temporaries_the_size_of_the_mask():
    mask = TissueMask(np.random.default_rng(0).random((1000, 800)) > 0.5, downsample=8.0, threshold=0.1)
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc
    try:
        mask.fractions([0, 4000], [0, 4000], 800.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * mask.mask.size  # the int32 integral image (4 bytes a pixel); int64 cumsums took 24


def test_the_largest_mask_counts_fit_the_integral_dtype():
    """`tissue_mask` thresholds an image of at most MAX_WHOLE_IMAGE_BYTES / 3 RGB pixels (`Slide.level_image`, the
    scanner thumbnail) and never enlarges it. Corner sums reach that count; left-to-right window sums stay within it."""
    largest = MAX_WHOLE_IMAGE_BYTES // 3
    dtype = integral_dtype(largest)
    assert dtype is np.int32 and -np.iinfo(dtype).max <= -largest and largest <= np.iinfo(dtype).max
    assert integral_dtype(np.iinfo(np.int32).max) is np.int32 and integral_dtype(2**31) is np.int64


# --- tissue mask on black ------------------------------------------------------------------------


def write_slide(path: Path, pixels: np.ndarray) -> Path:
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    return path


def dark_noise(shape: tuple[int, int]) -> np.ndarray:
    """What a camera sees without light (a failed scan, a scanner's padding outside the scanned area): black with
    sensor noise, whose few codes of difference between channels make a high saturation."""
    return np.clip(np.random.default_rng(0).normal(6, 3, (*shape, 3)), 0, 255).astype(np.uint8)


def test_a_black_slide_is_refused_as_black_not_scored_as_tissue(tmp_path):
    path = write_slide(tmp_path / "black.tif", dark_noise((1024, 1024)))
    with pytest.raises(InputError, match="no tissue found") as refused:
        prepare_slide(path, tile_size=224, mpp=0.5)
    assert "black" in str(refused.value) and "rescan" in refused.value.hint


def test_black_beside_the_tissue_is_background(tmp_path):
    with open_slide(CMU1) as real:
        tissue = real.read_region(0, 1500, 0, (1024, 1024))
    path = write_slide(tmp_path / "padded.tif", np.concatenate([tissue, dark_noise((1024, 1024))], axis=1))
    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_size=224, mpp=0.5)
    assert grid.tiles and all(tile.x < 1024 for tile in grid.tiles)  # none wholly in the black half
