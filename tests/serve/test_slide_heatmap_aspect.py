"""The slide heatmap on long narrow slides (a core biopsy, a strip of tissue): its squares sit over the tiles they score
along both axes, scored through a real ONNX Runtime session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from medtriage.serve.slides import SlideSettings, score_slide
from tests.serve.test_slides import nuclei_model

MPP, TILE = 0.5, 100  # tiles of 100 slide pixels
LONG, SHORT = 20_000, 300  # the thumbnail's short side, 15.36 pixels at its scale, rounds to 15
POSITIVE = (16_000, 17_000)  # along the long side: nucleus-dense (blue) tissue the model scores high
SETTINGS = SlideSettings(tile_size=TILE, tile_mpp=MPP, aggregation="mean")


@pytest.fixture(scope="module")
def predict(tmp_path_factory):
    import onnxruntime as ort

    session = ort.InferenceSession(str(nuclei_model(tmp_path_factory.mktemp("onnx") / "nuclei.onnx")), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"pixels": batch})[0]


def strip_slide(path: Path, tall: bool) -> Path:
    """Pink tissue over the whole strip, blue from POSITIVE[0] to POSITIVE[1] along its long side; tiled TIFF at MPP."""
    rng = np.random.default_rng(0)
    image = rng.integers(-12, 13, (LONG, SHORT, 3), dtype=np.int16) + np.array([225, 150, 200], np.int16)
    image[POSITIVE[0] : POSITIVE[1]] += np.array([90, 60, 160], np.int16) - [225, 150, 200]
    image = image.clip(0, 255).astype(np.uint8)
    image = image if tall else image.transpose(1, 0, 2)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", resolution=(1e4 / MPP,) * 2, resolutionunit="CENTIMETER")
    return path


@pytest.mark.parametrize("tall", [True, False], ids=["tall", "wide"])
def test_the_hot_region_lies_over_the_positive_tissue_along_the_long_side(predict, tmp_path, tall):
    heatmap = tmp_path / "heatmap.png"
    result = score_slide(strip_slide(tmp_path / "strip.tif", tall), predict, SETTINGS, heatmap_path=heatmap)
    assert result.n_tiles == (LONG // TILE) * (SHORT // TILE) and result.top_tiles[0]["probability"] > 0.9
    image = np.asarray(Image.open(heatmap).convert("RGB"))
    image = image if tall else image.transpose(1, 0, 2)  # long side first
    assert max(image.shape[:2]) == 1024
    hot = np.nonzero((image[..., 1] < 90).all(axis=1))[0]  # positive tiles: red squares over blue tissue, no green
    expected = np.array(POSITIVE) * image.shape[0] / LONG
    assert hot.min() == pytest.approx(expected[0], abs=1.5) and hot.max() + 1 == pytest.approx(expected[1], abs=1.5)
    assert len(hot) == hot.max() - hot.min() + 1  # one band, nothing hot elsewhere
    assert (image[..., 0] < 200).all()  # all of the strip to its far end under squares (bare pink tissue: red 225)


def test_the_tiling_overview_outlines_the_tiles_to_the_far_end_of_a_long_slide(tmp_path):
    """make_tiles' picture to check tiling by eye: its outlines are drawn at the thumbnail's scale along each axis."""
    from medtriage.io.pathology import grid_overview, prepare_slide

    prepared = prepare_slide(strip_slide(tmp_path / "strip.tif", tall=True), TILE, MPP)
    with prepared.slide:
        overview = np.asarray(grid_overview(prepared.slide, prepared.grid, prepared.mask, max_side=1024))
    outlined = np.nonzero((overview < 40).all(axis=2).any(axis=1))[0]  # rows holding a black outline
    assert max(prepared.grid.tiles, key=lambda t: t.y).y + TILE == LONG  # the last tile ends at the slide's end
    assert outlined.max() >= overview.shape[0] - 3  # and so does its outline
