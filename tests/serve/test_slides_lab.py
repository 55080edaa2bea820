"""Whole-slide scoring as a pathology lab meets it: slide thresholds met by float32 tile probabilities, slides of
glass or all tissue, tiles that fail to decode mid-slide, and what the reader keeps in memory.

The slides are generated: small tiled TIFFs at 0.5 µm/pixel with a stained square on white glass."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medtriage.errors import InputError
from medtriage.evaluation.operating_points import choose_priority_thresholds
from medtriage.format.aggregation import aggregate
from medtriage.io import slide_reader
from medtriage.io.pathology import tile_grid, tissue_mask
from medtriage.io.slide_reader import open_slide
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from medtriage.serve.slides import SlideScore, SlideSettings, score_slide, score_slide_file
from tests.serve.test_slides import with_pathology_block

TILE = 112  # tile side in pixels at 0.5 µm/pixel, as the pathology blocks here cut them
PIXELS_PER_CM = 2e4  # 0.5 µm/pixel
DARK, PALE = (215, 120, 180), (235, 195, 222)  # H&E shades: well stained, and pale (fat, loose stroma)


def stained(height: int, width: int, colour: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB tissue of one stain shade, with some texture."""
    return (np.array(colour, np.int16) + rng.integers(-15, 15, (height, width, 3))).clip(0, 255).astype(np.uint8)


def write_slide(path: Path, rgb: np.ndarray, **options) -> Path:
    """`rgb` as a tiled TIFF slide at 0.5 µm/pixel."""
    tifffile.imwrite(
        path, rgb, tile=(128, 128), photometric="rgb", resolution=(PIXELS_PER_CM, PIXELS_PER_CM), resolutionunit="CENTIMETER", **options
    )
    return path


def generated_slide(path: Path, side: int = 448, tissue: tuple[int, int, int, int] = (0, 0, 224, 224), **options) -> Path:
    """White glass of `side` pixels with H&E-pink tissue in the `tissue` box (x0, y0, x1, y1)."""
    rgb = np.full((side, side, 3), 245, np.uint8)
    x0, y0, x1, y1 = tissue
    rgb[y0:y1, x0:x1] = stained(y1 - y0, x1 - x0, DARK, np.random.default_rng(0))
    return write_slide(path, rgb, **options)


# --- slide thresholds and float32 tile probabilities ---------------------------------------------


def served_with_tiles(package: Path, tile_probabilities: np.ndarray) -> Predictor:
    """A predictor whose model serves each tile of a batch, in grid order, the float32 of its validation probability."""
    predictor = Predictor(load_package(package), threads=1)

    def outputs(batch: np.ndarray) -> tuple[np.ndarray, None]:
        probs = np.empty((len(batch), len(predictor.package.label_names)), np.float32)
        probs[:] = (1.0 - tile_probabilities[: len(batch), None]) / (probs.shape[1] - 1)
        probs[:, predictor.positive] = tile_probabilities[: len(batch)]
        return probs, None

    predictor.outputs = outputs
    return predictor


@pytest.mark.parametrize("aggregation", ["top_k", "mean"])
def test_a_slide_whose_validation_score_is_the_slide_threshold_keeps_its_priority(package_copy, tmp_path, aggregation):
    """Export chose the slide threshold among float64 slide scores; served tiles are float32 probabilities, each here
    rounding below its validation value. The slide at the threshold must still be served at review."""
    f0 = np.float32(0.7)
    ulp = float(np.spacing(f0))
    validation = np.array([float(f0) + ulp / 4, float(f0) + 2.25 * ulp] * 2)  # the slide's four tile probabilities
    served = validation.astype(np.float32)
    assert (served < validation).all()
    at_threshold = aggregate(validation, aggregation, 2)
    thresholds = choose_priority_thresholds(np.array([0.2, at_threshold, 0.9]), np.array([0, 1, 1]), "sensitivity", 1.0)
    assert thresholds["review"]["threshold"] == at_threshold > aggregate(served.astype(np.float64), aggregation, 2)
    package = with_pathology_block(
        package_copy, stain_normalization=None, tile_size=TILE, aggregation=aggregation, top_k=2, slide_thresholds=thresholds
    )
    result = score_slide_file(served_with_tiles(package, served), generated_slide(tmp_path / "slide.tif"))
    assert isinstance(result, SlideScore), result
    assert result.n_tiles == 4 and result.threshold_level == "slide"
    assert result.priority == "review" and result.probability == float(np.float32(at_threshold))


# --- tissue masks of slides without glass ---------------------------------------------------------


@pytest.mark.parametrize("shades", [(DARK, DARK), (PALE, DARK)], ids=["one shade", "pale and dark"])
def test_a_slide_covered_in_tissue_keeps_all_of_it(tmp_path, shades):
    """No glass for the mask to split off: the tissue must not be split in two (its paler part called glass)."""
    rng = np.random.default_rng(1)
    rgb = np.concatenate([stained(4 * TILE, 2 * TILE, shade, rng) for shade in shades], axis=1)
    with open_slide(write_slide(tmp_path / "tissue.tif", rgb)) as slide:
        mask = tissue_mask(slide)
        grid = tile_grid(slide, TILE, 0.5, mask)
    assert mask.mask.all() and len(grid.tiles) == grid.n_candidates == 16


# --- a tile that fails to decode mid-slide --------------------------------------------------------


def pyramid_with_damaged_tile(path: Path, tile_index: int) -> Path:
    """A two-level deflate-compressed pyramid (0.5 and 1 µm/pixel) with tissue on its left half, whose level-0 tile
    `tile_index` (row-major, 128-pixel tiles) is garbage: the mask reads level 1 intact, the model's tiles hit it."""
    rgb = np.full((512, 512, 3), 245, np.uint8)
    rgb[:, :256] = stained(512, 256, DARK, np.random.default_rng(2))
    options = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, subifds=1, resolution=(PIXELS_PER_CM, PIXELS_PER_CM), **options)
        tif.write(rgb[::2, ::2], subfiletype=1, resolution=(PIXELS_PER_CM / 2, PIXELS_PER_CM / 2), **options)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[tile_index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 16)
    return path


def test_a_tile_that_fails_to_decode_mid_slide_names_the_slide_and_where(tmp_path):
    slide = pyramid_with_damaged_tile(tmp_path / "damaged.tif", tile_index=9)  # row 2, column 1: tissue
    heatmaps = tmp_path / "heatmaps"
    heatmaps.mkdir()
    predict = lambda batch: np.full((len(batch), 2), 0.5, np.float32)  # noqa: E731
    with pytest.raises(InputError) as caught:
        score_slide(slide, predict, SlideSettings(tile_size=TILE), heatmap_path=heatmaps / "damaged.png")
    message = str(caught.value)
    assert str(slide) in message and "level 0" in message
    x0, y0 = map(int, re.search(r"level-0 pixel \((\d+), (\d+)\)", message).groups())
    assert x0 < 256 and x0 + TILE > 128 and y0 < 384 and y0 + TILE > 256  # a region over the damaged TIFF tile
    assert list(heatmaps.iterdir()) == []  # nothing half-written


# --- memory -------------------------------------------------------------------------------------


def test_a_reader_keeps_decoded_tiles_within_its_byte_budget(tmp_path, monkeypatch):
    """Files differ in tile size (240 to thousands of pixels): the cache is bounded in bytes, and reads stay right."""
    rgb = stained(1024, 1024, DARK, np.random.default_rng(3))
    tifffile.imwrite(tmp_path / "big_tiles.tif", rgb, tile=(256, 256), photometric="rgb", resolution=(PIXELS_PER_CM, PIXELS_PER_CM))
    tile_bytes = 256 * 256 * 3
    monkeypatch.setattr(slide_reader, "TILE_CACHE_BYTES", 3 * tile_bytes)
    with open_slide(tmp_path / "big_tiles.tif", mpp=0.5) as slide:
        reader = slide.shared_reader
        for y in range(0, 1024, 200):
            for x in range(0, 1024, 200):
                size = (min(200, 1024 - x), min(200, 1024 - y))
                assert (reader.read(x, y, 0, size) == rgb[y : y + size[1], x : x + size[0]]).all()
                assert sum(t.nbytes for t in reader._cache.values()) <= 3 * tile_bytes
