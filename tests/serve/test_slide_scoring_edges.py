"""Whole-slide scoring at its edges: tiles unlike the training tiles (OOD) in the slide score, threads reading ahead
of the model, slides refused after they were opened (closed, not leaked), tissue in the partial tiles at the slide's
edge, tile settings that cannot make a grid, and what make_tiles writes (slide names, the overview PNG)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medtriage.errors import ConfigError, InputError
from medtriage.io import pathology
from medtriage.io.pathology import iter_tile_batches, prepare_slide
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection, to_model_channels
from medtriage.serve.slides import SlideScore, SlideSettings, aggregate, score_slide, score_slide_file
from tests.serve.test_slides import CMU1, with_pathology_block

BLOCK = {"stain_normalization": None, "tile_size": 112, "tile_mpp": 0.5, "top_k": 3}


# --- tiles unlike the training tiles -------------------------------------------------------------


def slide_package(safe_package_dir: Path, folder: Path, ood_threshold: float | None = None, **block) -> Path:
    """The package with an OOD output, given a pathology block (and, optionally, another OOD threshold)."""
    package = with_pathology_block(Path(shutil.copytree(safe_package_dir, folder)), **{**BLOCK, **block})
    if ood_threshold is not None:
        meta = json.loads((package / "model.json").read_text())
        meta["ood"]["threshold"] = ood_threshold
        (package / "model.json").write_text(json.dumps(meta))
    return package


def tile_outputs_of(predictor: Predictor) -> tuple[np.ndarray, np.ndarray]:
    """Positive-class probability and OOD score of every CMU-1 tissue tile, straight from the ONNX session."""
    prepared = prepare_slide(CMU1, BLOCK["tile_size"], BLOCK["tile_mpp"])
    with prepared.slide:
        outputs = [predictor.outputs(to_model_channels(batch, predictor.package.channels)) for _, batch in iter_tile_batches(prepared)]
    return np.concatenate([p for p, _ in outputs])[:, predictor.positive], np.concatenate([o for _, o in outputs])


def test_unusual_tiles_are_left_out_of_the_slide_score(safe_package_dir, tmp_path):
    reference = Predictor(load_package(slide_package(safe_package_dir, tmp_path / "reference")), threads=1)
    probs, ood = tile_outputs_of(reference)
    threshold = float(np.quantile(ood, 0.75))  # a quarter of the tiles above it
    package = slide_package(safe_package_dir, tmp_path / "quartile", threshold, aggregation="mean")
    result = score_slide_file(Predictor(load_package(package), threads=1), CMU1)
    assert isinstance(result, SlideScore), result
    usual = ood <= threshold
    assert result.probability == pytest.approx(aggregate(probs[usual], "mean", 3), abs=1e-5)
    assert [t["probability"] for t in result.top_tiles] == pytest.approx(np.sort(probs[usual])[::-1][:5], abs=1e-4)
    assert result.n_tiles == len(ood) and result.n_unusual == int((~usual).sum()) > 0 and result.flags == []


def test_a_slide_whose_tiles_are_mostly_unusual_is_withheld(safe_package_dir, tmp_path):
    reference = Predictor(load_package(slide_package(safe_package_dir, tmp_path / "reference")), threads=1)
    _, ood = tile_outputs_of(reference)
    threshold = float(np.quantile(ood, 0.25))  # three quarters of the tiles above it
    package = load_package(slide_package(safe_package_dir, tmp_path / "quartile", threshold))
    withheld = score_slide_file(Predictor(package, threads=1), CMU1)
    assert isinstance(withheld, Rejection) and withheld.code == "unusual_input", withheld
    flagged = score_slide_file(Predictor(package, threads=1, allow_out_of_scope=True), CMU1)
    assert isinstance(flagged, SlideScore) and flagged.flags == ["unusual_input"] and flagged.n_tiles == len(ood)


# --- reading tiles with threads ------------------------------------------------------------------


def test_threads_read_a_few_batches_ahead_not_the_whole_slide(monkeypatch):
    reads, read_tile = [], pathology.read_tile
    lock = threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            reads.append(1)
        return read_tile(*args, **kwargs)

    monkeypatch.setattr(pathology, "read_tile", counted)
    prepared = prepare_slide(CMU1, 112, 0.5)
    with prepared.slide:
        batches = iter_tile_batches(prepared, batch_size=4, workers=2)
        first, _ = next(batches)
        time.sleep(1.0)  # a slow model: the readers must wait for it, not fill memory with the slide
        assert len(first) == 4 and len(reads) <= 4 * (1 + 2 * pathology.READ_AHEAD_PER_WORKER)
        assert sum(len(tiles) for tiles, _ in batches) + 4 == len(prepared.grid.tiles)
        batches.close()


def test_a_model_failing_mid_slide_stops_the_reader_threads_before_the_slide_is_closed():
    """Before, the reader threads outlived the failure for as long as its traceback did (a caller reporting the error
    holds it), reading ahead from a slide whose file was closed under them."""
    before = set(threading.enumerate())

    def failing(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError, match="the model failed") as failure:
        score_slide(CMU1, failing, SlideSettings(tile_size=112, stain_normalization=None), batch_size=4, workers=3)
    readers = [t.name for t in threading.enumerate() if t not in before and t.name.startswith("ThreadPoolExecutor")]
    assert failure.tb is not None and readers == []


# --- a slide refused after it was opened ---------------------------------------------------------


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_slide_refused_after_opening_is_closed():
    before = open_descriptors()
    for _ in range(5):
        with pytest.raises(InputError, match="coarser"):
            prepare_slide(CMU1, 224, 0.25)  # a 20x scan for a 40x model: refused once the grid is laid out
    assert open_descriptors() == before


# --- the slide's right and bottom edges ----------------------------------------------------------


def edge_slide(path: Path, width: int, height: int, tissue_from_x: int, mpp: float = 0.5) -> Path:
    """Glass with H&E-coloured tissue from `tissue_from_x` to the right edge; tiled TIFF at `mpp`."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(238, 3, (height, width, 3)), 0, 255).astype(np.uint8)
    image[:, tissue_from_x:] = np.clip(rng.normal((170, 90, 160), 12, (height, width - tissue_from_x, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", resolution=(1e4 / mpp,) * 2, resolutionunit="CENTIMETER")
    return path


def test_tissue_along_the_right_edge_is_tiled(tmp_path):
    """Three quarters of a tile of tissue at the right edge: a tile of 75% tissue, like one inside the slide."""
    path = edge_slide(tmp_path / "edge.tif", width=2 * 224 + 168, height=3 * 224, tissue_from_x=2 * 224)
    prepared = prepare_slide(path, 224, 0.5)
    with prepared.slide:
        tiles = prepared.grid.tiles
        assert [t.x for t in tiles] == [448] * 3 and [t.y for t in tiles] == [0, 224, 448]
        assert all(0.6 < t.tissue_fraction <= 0.75 for t in tiles)  # 75%, to the mask's 8 µm cells
        _, batch = next(iter_tile_batches(prepared))
    assert batch.shape == (3, 3, 224, 224)
    beyond = batch[:, :, :, 168:]  # past the slide's edge: white glass, whatever the reader does there
    assert (beyond == 1.0).all() and batch[:, 0, :, :160].mean() < 0.75


def test_an_edge_tile_mostly_beyond_the_slide_is_background(tmp_path):
    path = edge_slide(tmp_path / "sliver.tif", width=2 * 224 + 56, height=2 * 224, tissue_from_x=2 * 224)
    with pytest.raises(InputError, match="no tissue found: none of 6 tile positions"):
        prepare_slide(path, 224, 0.5)  # a quarter of a tile of tissue is below min_tissue


# --- tile settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_size, tile_mpp", [(0, 0.5), (224, 0.0), (224, float("nan"))])
def test_tile_settings_that_cannot_make_a_grid_are_a_config_error(tile_size, tile_mpp):
    from medtriage.errors import ConfigError

    with pytest.raises(ConfigError, match="must be positive"):
        prepare_slide(CMU1, tile_size, tile_mpp)


# --- make_tiles ----------------------------------------------------------------------------------


def test_make_tiles_refuses_two_slides_of_one_name(tmp_path, capsys):
    from medtriage.cli.make_tiles import main

    for site in ("site_a", "site_b"):
        (tmp_path / site).mkdir()
        shutil.copy(CMU1, tmp_path / site / "slide1.svs")
    code = main(["slides", str(tmp_path / "pool"), str(tmp_path / "site_a" / "slide1.svs"), str(tmp_path / "site_b" / "slide1.svs")])
    assert code == 2 and "several slides are named slide1" in capsys.readouterr().err
    assert not (tmp_path / "pool").exists()


def test_make_tiles_overview_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from PIL import Image

    from medtriage.cli.make_tiles import save_overview

    out = tmp_path / "overview.png"
    save_overview(CMU1, out, 224, 0.5, None)
    before = out.read_bytes()

    def disk_full(image, fp, filename, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(Image.SAVE, "PNG", disk_full)
    with pytest.raises(ConfigError, match="cannot be written \\(No space left on device\\)"):
        save_overview(CMU1, out, 224, 0.5, None)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["overview.png"]


def test_make_tiles_overview_shows_the_first_slide_in_the_pool(tmp_path, capsys):
    """A first slide left out of the pool (it is in rejects.csv) must not fail a run that built the pool."""
    from medtriage.cli.make_tiles import main

    unreadable = tmp_path / "unreadable.svs"
    unreadable.write_bytes(b"not a slide")
    slide = Path(shutil.copy(CMU1, tmp_path / "0042.svs"))  # a name that reads as a number
    overview = tmp_path / "overview.png"
    code = main(["slides", str(tmp_path / "pool"), str(unreadable), str(slide), "--overview", str(overview)])
    out = capsys.readouterr().out
    assert code == 0 and overview.is_file() and f"overview {overview} of 0042.svs" in out
