"""Whole-slide reading, tissue mask, tile grid and stain normalisation on the real CMU-1 crop and made-up slides."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medtriage.errors import DataNotFoundError, InputError
from medtriage.io.pathology import (
    iter_tile_batches,
    open_slide,
    otsu_threshold,
    prepare_slide,
    read_tile,
    read_tile_rgb,
    tile_grid,
    tissue_mask,
)
from medtriage.io.stain import (
    BACKGROUND_INTENSITY,
    MAX_FIT_PIXELS,
    OD_THRESHOLD,
    REFERENCE_STAINS,
    StainNormalizer,
    Stains,
    augment_stain,
    fit_stains,
)
from tests.io.damage import mutations, untyped_failures

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


# --- the fast paths against the textbook maths (float64, whole arrays, no tables or buffers) -------


def reference_fit(tiles: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Macenko on every k-th pixel of the concatenated uint8 tiles, all in float64."""
    rgb = np.concatenate([t.reshape(-1, 3) for t in tiles]).T.astype(np.float64)
    rgb = rgb[:, :: max(1, rgb.shape[1] // MAX_FIT_PIXELS)]
    od = np.clip(-np.log(np.maximum(rgb, 1) / 255.0 / BACKGROUND_INTENSITY), 0, None)
    tissue = od[:, np.linalg.norm(od, axis=0) > OD_THRESHOLD]
    _, eigvecs = np.linalg.eigh(np.cov(tissue))
    plane = eigvecs[:, 1:3] * np.where(eigvecs[0, 1:3] < 0, -1, 1)
    angles = np.arctan2(*(plane.T @ tissue)[::-1])
    low, high = np.percentile(angles, [1, 99])
    vectors = [plane @ [np.cos(a), np.sin(a)] for a in (low, high)]
    matrix = np.stack(sorted(vectors, key=lambda v: -v[0]), axis=1)
    matrix = np.abs(matrix) / np.linalg.norm(matrix, axis=0)
    return matrix, np.percentile(np.linalg.pinv(matrix) @ tissue, 99, axis=1)


def reference_restain(rgb: np.ndarray, source: Stains, target: Stains) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float64 `[3, H, W]` restained: I0 * exp(-target @ scaled clip(pinv(source) @ OD))."""
    od = np.clip(-np.log(np.maximum(rgb.reshape(-1, 3).T.astype(np.float64), 1) / 255.0 / BACKGROUND_INTENSITY), 0, None)
    concentrations = np.clip(np.linalg.pinv(source.matrix) @ od, 0, None)
    scaled = concentrations * (target.max_concentrations / source.max_concentrations)[:, None]
    return (BACKGROUND_INTENSITY * np.exp(-target.matrix @ scaled)).reshape(3, *rgb.shape[:2])


@pytest.fixture(scope="module")
def cmu1_tiles(slide, mask):
    grid = tile_grid(slide, tile_size=224, mpp=0.5, mask=mask)
    return [read_tile_rgb(slide.reader(), grid, t) for t in grid.tiles[::3]]


def test_fast_stain_fit_matches_the_reference_maths(cmu1_tiles):
    matrix, max_concentrations = reference_fit(cmu1_tiles)
    fitted = fit_stains(cmu1_tiles)
    np.testing.assert_allclose(fitted.matrix, matrix, atol=1e-4)
    np.testing.assert_allclose(fitted.max_concentrations, max_concentrations, rtol=1e-4)
    as_served = fit_stains([np.moveaxis(t, -1, 0).astype(np.float32) / 255.0 for t in cmu1_tiles])  # float tiles
    np.testing.assert_allclose(as_served.matrix, matrix, atol=1e-3)


def test_fast_restaining_matches_the_reference_maths(cmu1_tiles):
    source = fit_stains(cmu1_tiles)
    normalizer = StainNormalizer(source, REFERENCE_STAINS)
    batch = np.zeros((2, 3, 224, 224), np.float32)
    for rgb, out in zip(cmu1_tiles[:2], batch):
        assert normalizer.from_rgb(rgb, out=out) is out
        np.testing.assert_allclose(out, reference_restain(rgb, source, REFERENCE_STAINS), atol=2e-6)
    as_served = np.moveaxis(cmu1_tiles[0], -1, 0).astype(np.float32) / 255.0
    np.testing.assert_allclose(normalizer(as_served), batch[0], atol=1e-7)  # float tiles take the same path
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(normalizer))(as_served), normalizer(as_served))
    with pytest.raises(ValueError, match="C-contiguous"):
        normalizer.from_rgb(cmu1_tiles[0], out=np.zeros((224, 224, 3), np.float32).transpose(2, 0, 1))


def test_stain_fit_keeps_pale_eosin_pixels():
    """Eosin with almost no red OD: pure-eosin pixels must count, or the fitted eosin drifts towards haematoxylin."""
    rng = np.random.default_rng(0)
    stains = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    stains /= np.linalg.norm(stains, axis=0)
    eosin_only = np.stack([np.zeros(7000), rng.uniform(0.2, 0.8, 7000)])
    nuclei = np.stack([rng.uniform(0.3, 1.5, 3000), rng.uniform(0.0, 0.3, 3000)])
    od = stains @ np.concatenate([eosin_only, nuclei], axis=1)
    rgb = np.clip(np.rint(240 * np.exp(-od)), 0, 255).astype(np.uint8).T.reshape(100, 100, 3)
    fitted = fit_stains(rgb).matrix
    cosines = np.sum(fitted * stains, axis=0)
    assert np.degrees(np.arccos(np.clip(cosines, -1, 1))).max() < 3


def test_tissue_fractions_are_the_window_means(slide, mask):
    grid = tile_grid(slide, tile_size=112, mpp=0.5, mask=mask, min_tissue=0.0)
    d, dy = mask.downsample, mask.row_downsample
    for tile in grid.tiles[::7]:
        r0, c0 = int(tile.y / dy), int(tile.x / d)
        r1 = max(int(np.ceil((tile.y + grid.size0) / dy)), r0 + 1)
        c1 = max(int(np.ceil((tile.x + grid.size0) / d)), c0 + 1)
        inside = min(1, (slide.dimensions[0] - tile.x) / grid.size0) * min(1, (slide.dimensions[1] - tile.y) / grid.size0)
        assert tile.tissue_fraction == round(float(mask.mask[r0:r1, c0:c1].mean()) * inside, 4)  # beyond the edge: background
    assert len(grid.tiles) == grid.n_candidates


def test_tile_batches_are_the_tiles_read_one_by_one():
    prepared = prepare_slide(CMU1, tile_size=112, mpp=0.5, stain_normalize=True)
    with prepared.slide:
        tiles, batch = next(iter_tile_batches(prepared, batch_size=8))
        one_by_one = [read_tile(prepared.slide.reader(), prepared.grid, t, prepared.normalizer) for t in tiles]
        prepared.normalizer = None
        _, plain = next(iter_tile_batches(prepared, batch_size=8))
        rgb = read_tile_rgb(prepared.slide.reader(), prepared.grid, tiles[0])
    np.testing.assert_array_equal(batch, np.stack(one_by_one))
    np.testing.assert_array_equal(plain[0], np.moveaxis(rgb, -1, 0).astype(np.float32) / 255)


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


RESOLUTION = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}  # 0.5 µm/pixel
NOT_BRIGHTFIELD = {  # what microscopes write that is not an 8-bit RGB brightfield scan, and what the error names
    "greyscale": (np.zeros((512, 512), np.uint8), {"photometric": "minisblack"}, "1 sample(s) each, photometric MINISBLACK"),
    "16-bit RGB": (np.zeros((512, 512, 3), np.uint16), {"photometric": "rgb"}, "uint16 pixels"),
    "float RGB": (np.zeros((512, 512, 3), np.float32), {"photometric": "rgb"}, "float32 pixels"),
    "CMYK": (np.zeros((512, 512, 4), np.uint8), {"photometric": "separated"}, "photometric SEPARATED"),
    "fluorescence channels": (
        np.zeros((4, 512, 512), np.uint8),
        {"ome": True, "metadata": {"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}},
        "in 4 C planes",
    ),
}


@pytest.mark.parametrize("kind", NOT_BRIGHTFIELD)
def test_a_slide_that_is_not_8_bit_rgb_brightfield_is_refused_by_name(tmp_path, kind):
    """Read as RGB, these would be scored as garbage (16-bit values wrap, floats become 0, channels become colours)."""
    pixels, layout, named = NOT_BRIGHTFIELD[kind]
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), **RESOLUTION, **layout)
    with pytest.raises(InputError, match="not an 8-bit RGB brightfield slide") as err:
        open_slide(path)
    assert named in str(err.value) and "export the slide as 8-bit RGB" in str(err.value)


@pytest.mark.parametrize(
    "pixels, layout",
    [
        (np.zeros((3, 512, 512), np.uint8), {"photometric": "rgb", "planarconfig": "separate"}),
        (np.zeros((6, 512, 512), np.uint8), {"ome": True, "metadata": {"axes": "ZYX", "PhysicalSizeX": 0.5}}),
    ],
    ids=["planar RGB", "z-stack"],
)
def test_a_tiff_layout_the_reader_cannot_tile_is_unsupported_not_damaged(tmp_path, pixels, layout):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), **RESOLUTION, **layout)
    with pytest.raises(InputError, match="unsupported slide layout") as err:
        open_slide(path)
    assert "damaged" not in str(err.value) and "export the slide as 8-bit RGB" in str(err.value)


def test_an_rgb_ome_tiff_reads_like_the_image_it_holds(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", ome=True, metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, (512, 512)), image)


@pytest.mark.parametrize("size, unit, mpp", [("0.25", "µm", 0.25), ("500", "nm", 0.5), ("0.5", None, 0.5)])
def test_an_ome_tiff_gives_its_resolution_in_its_ome_xml(tmp_path, size, unit, mpp):
    path = tmp_path / "slide.ome.tif"
    physical = {"PhysicalSizeX": size, "PhysicalSizeY": size} | ({"PhysicalSizeXUnit": unit} if unit else {})
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb", ome=True, metadata=physical)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(mpp)


@pytest.mark.parametrize("pixels_per_cm", [1e6, 1e9])
def test_an_implausibly_fine_resolution_tag_is_refused_before_it_sizes_the_tiles(tmp_path, pixels_per_cm):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(
        path,
        np.zeros((512, 512, 3), np.uint8),
        tile=(256, 256),
        photometric="rgb",
        resolution=(pixels_per_cm,) * 2,
        resolutionunit="CENTIMETER",
    )
    with pytest.raises(InputError, match="implausible scan resolution from the slide's metadata") as err:
        open_slide(path)
    assert "--mpp" in str(err.value)
    with open_slide(path, mpp=0.5) as slide:  # the remedy the error names
        assert slide.mpp == 0.5


@pytest.mark.parametrize("override", [0.0, -1.0, 0.001, float("nan")])
def test_an_implausible_resolution_override_is_refused(override):
    with pytest.raises(InputError, match="implausible scan resolution from the override"):
        open_slide(CMU1, mpp=override)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("photometric, samples", [("MONOCHROME2", 1), ("RGB", 4)])
def test_a_dicom_whole_slide_image_that_is_not_rgb_brightfield_is_refused_before_decoding(dicom_wsi, tmp_path, photometric, samples):
    import pydicom

    folder = shutil.copytree(dicom_wsi, tmp_path / "slide")
    for path in folder.iterdir():  # what a fluorescence scanner's series says of its pixels
        dataset = pydicom.dcmread(path)
        dataset.PhotometricInterpretation, dataset.SamplesPerPixel = photometric, samples
        dataset.save_as(path)
    with pytest.raises(InputError, match=f"not an 8-bit RGB brightfield slide: level 0 holds 8-bit pixels, {samples} sample"):
        open_slide(folder)


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


def test_io_pathology_imports_without_torch(run_without_training_stack):
    result = run_without_training_stack(
        f"""
        from medtriage.io.pathology import prepare_slide
        import medtriage.serve.slides
        print(len(prepare_slide({str(CMU1)!r}, 224, 0.5, stain_normalize=True).grid.tiles))
        """
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 10


def test_a_dicom_whole_slide_image_tiles_like_the_slide_it_was_made_from(dicom_wsi):
    from medtriage.io.slide_reader import DicomSlide, is_slide_path

    assert is_slide_path(dicom_wsi)
    one_file = next(p for p in sorted(dicom_wsi.iterdir()) if p.suffix == ".dcm")
    for path in (dicom_wsi, one_file):  # the folder, or any file of its series
        with open_slide(path) as slide:
            assert isinstance(slide, DicomSlide) and slide.path == dicom_wsi
    with open_slide(CMU1) as svs, open_slide(dicom_wsi) as wsi:
        assert wsi.dimensions == svs.dimensions and wsi.mpp == pytest.approx(svs.mpp, rel=1e-3)
        difference = np.abs(wsi.read_region(500, 600, 0, (224, 224)).astype(int) - svs.read_region(500, 600, 0, (224, 224)))
        assert difference.mean() < 3  # the same pixels, JPEG-encoded once more
    from_svs, from_dicom = prepare_slide(CMU1, 224, 0.5), prepare_slide(dicom_wsi, 224, 0.5)
    assert [(t.x, t.y) for t in from_dicom.grid.tiles] == [(t.x, t.y) for t in from_svs.grid.tiles]


def test_a_folder_without_a_whole_slide_image_is_a_clear_error(tmp_path):
    from pydicom.data import get_testdata_file

    (tmp_path / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    with pytest.raises(InputError, match="no DICOM whole-slide image files"):
        open_slide(tmp_path)


@pytest.mark.parametrize("kept", [("LABEL",), ("LABEL", "OVERVIEW", "THUMBNAIL")])
def test_a_dicom_whole_slide_series_without_pyramid_levels_names_what_it_holds_instead(dicom_wsi, tmp_path, kept):
    """Before, wsidicom's "Level files not found in provided files" came through as an unreadable series."""
    import pydicom

    folder = tmp_path / "slide"
    folder.mkdir()
    for path in dicom_wsi.iterdir():
        if pydicom.dcmread(path, stop_before_pixels=True).ImageType[2] in kept:
            shutil.copy(path, folder)
    with pytest.raises(InputError, match="has no pyramid levels: no VOLUME image among its") as caught:
        open_slide(folder)
    assert all(f"1 {flavour}" in str(caught.value) for flavour in kept)
    assert str(folder) in str(caught.value) and "copy the slide's VOLUME image files" in str(caught.value)


def test_a_dicom_whole_slide_image_closes_its_files_even_when_wsidicom_fails_to_close(dicom_wsi):
    slide = open_slide(dicom_wsi)
    files = list(slide._files)
    wsidicom_close = slide._wsi.close

    def failing_close() -> None:
        wsidicom_close()
        raise OSError("disk went away")

    slide._wsi.close = failing_close
    with pytest.raises(Exception) as caught:
        slide.close()
    assert files and all(file.closed for file in files)  # before, wsidicom's error skipped closing them
    assert isinstance(caught.value, InputError) and isinstance(caught.value.__cause__, OSError)
    assert "closing the DICOM whole-slide image failed (OSError: disk went away); its files were closed" in str(caught.value)


def _flat_slide(path: Path) -> tuple[Path, np.ndarray]:
    """A single-level slide (no pyramid, no scanner thumbnail): gradients and one block of tissue colour."""
    y, x = np.mgrid[0:1536, 0:2048]
    image = np.stack([x * 255 // 2048, y * 255 // 1536, (x + y) % 256], -1).astype(np.uint8)
    image[400:900, 500:1400] = (180, 90, 160)
    return write_tiff(path, image), image


def _thumbnail_and_peak(path: Path) -> tuple[np.ndarray, int, np.ndarray]:
    import tracemalloc

    with open_slide(path) as flat:
        tracemalloc.start()
        try:
            thumbnail = flat.thumbnail(256)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return thumbnail, peak, tissue_mask(flat).mask


def test_a_level_too_large_to_decode_whole_is_shrunk_block_by_block(tmp_path, monkeypatch):
    from medtriage.io import slide_reader

    path, image = _flat_slide(tmp_path / "flat.tif")
    whole, whole_peak, whole_mask = _thumbnail_and_peak(path)
    monkeypatch.setattr(slide_reader, "READ_BLOCK_BYTES", 3 * 300 * 300)  # blocks of 300 x 300 pixels
    blocked, blocked_peak, blocked_mask = _thumbnail_and_peak(path)
    assert blocked.shape == whole.shape == (192, 256, 3)
    assert np.abs(blocked.astype(int) - whole).mean() < 3  # block edges are resampled on their own
    assert (blocked_mask != whole_mask).mean() < 0.05
    assert blocked_peak < whole_peak - image.nbytes // 2  # the level was never held whole


def test_a_level_shrunk_block_by_block_shows_how_far_it_is(tmp_path, monkeypatch, capsys):
    """A level of billions of pixels takes minutes to shrink for the mask and the thumbnail."""
    from medtriage.io import slide_reader

    path, _ = _flat_slide(tmp_path / "flat.tif")
    monkeypatch.setattr(slide_reader, "READ_BLOCK_BYTES", 3 * 300 * 300)
    with open_slide(path) as flat:
        flat.thumbnail(256)
    assert "flat.tif: level 0 (2048 x 1536)" in capsys.readouterr().err


def test_a_whole_level_image_beyond_the_limit_is_refused(tmp_path, monkeypatch):
    from medtriage.io import slide_reader

    path, _ = _flat_slide(tmp_path / "flat.tif")
    monkeypatch.setattr(slide_reader, "MAX_WHOLE_IMAGE_BYTES", 3 * 1000 * 1000)
    with open_slide(path) as flat:
        assert flat.thumbnail(256).shape == (192, 256, 3) and tissue_mask(flat).mask.shape == (96, 128)  # small: fine
        with pytest.raises(InputError, match="exceeds the limit"):
            flat.level_image(0)  # 2048 x 1536 RGB at full size


def _repeated_tile_slide(path: Path, side: int = 1 << 17, tile: int = 4096, pixels: bytes | None = None) -> Path:
    """A classic TIFF claiming a `side` square level (0.5 µm/pixel, no pyramid) whose every tile offset points at
    one deflated tile (`pixels`, blank by default): a file of kilobytes that would take minutes of decoding to read
    whole."""
    import struct
    import zlib

    count = (side // tile) ** 2
    data = zlib.compress(bytes(tile * tile * 3) if pixels is None else pixels, 9)
    entries = 14
    extra = 8 + 2 + entries * 12 + 4  # where the out-of-entry values start
    bits, xres, yres = extra, extra + 6, extra + 14
    offsets, counts, payload = extra + 22, extra + 22 + 4 * count, extra + 22 + 8 * count
    tags = [
        (256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, bits), (259, 3, 1, 8), (262, 3, 1, 2), (277, 3, 1, 3),
        (282, 5, 1, xres), (283, 5, 1, yres), (284, 3, 1, 1), (296, 3, 1, 3), (322, 4, 1, tile), (323, 4, 1, tile),
        (324, 4, count, offsets), (325, 4, count, counts),
    ]  # fmt: skip
    assert len(tags) == entries
    ifd = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", entries)
    ifd += b"".join(struct.pack("<HHII", *tag) for tag in tags) + struct.pack("<I", 0)
    values = struct.pack("<3H", 8, 8, 8) + struct.pack("<4I", 20000, 1, 20000, 1)
    tables = struct.pack(f"<{count}I", *[payload] * count) + struct.pack(f"<{count}I", *[len(data)] * count)
    path.write_bytes(ifd + values + tables + data)
    return path


def test_a_small_file_claiming_a_huge_level_without_a_pyramid_is_refused_before_decoding_it(tmp_path):
    path = _repeated_tile_slide(tmp_path / "claims.tif")
    assert path.stat().st_size < 1 << 20
    with open_slide(path) as claimed:
        assert claimed.dimensions == (1 << 17, 1 << 17) and claimed.level_count == 1
        assert claimed.read_region(0, 0, 0, (64, 64)).max() == 0  # a readable slide: tiles still serve
        for whole_level_image in (claimed.thumbnail, lambda: tissue_mask(claimed)):
            with pytest.raises(InputError, match="would be decoded whole") as refused:
                whole_level_image()
            assert "pyramid" in refused.value.hint


def _tile_every_batch(path: Path) -> None:
    for _ in iter_tile_batches(prepare_slide(path, 224, 0.5), 16):
        pass


def test_a_damaged_slide_is_an_input_error_whatever_the_damage(tmp_path):
    from medtriage.errors import MedTriageError

    path, _ = _flat_slide(tmp_path / "flat.tif")
    damaged = tmp_path / "damaged.tif"

    def read(data: bytes) -> None:
        damaged.write_bytes(data)
        _tile_every_batch(damaged)

    assert untyped_failures(mutations(path.read_bytes(), 300), read, MedTriageError) == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and wsidicom warn about the damaged values they read
def test_a_damaged_dicom_whole_slide_image_is_an_input_error_whatever_the_damage(dicom_wsi, tmp_path):
    from medtriage.errors import MedTriageError

    finest = max(dicom_wsi.iterdir(), key=lambda p: p.stat().st_size)
    folder = tmp_path / "slide"

    def read(data: bytes) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(dicom_wsi, folder)
        (folder / finest.name).write_bytes(data)
        _tile_every_batch(folder)

    assert untyped_failures(mutations(finest.read_bytes(), 100), read, MedTriageError) == []


def test_every_reader_reads_the_slide_inside_its_edge_and_white_glass_beyond(dicom_wsi, monkeypatch):
    with open_slide(CMU1) as svs, open_slide(dicom_wsi) as wsi:
        width, height = svs.dimensions
        corner = (width - 150, height - 100, 0, (300, 200))  # 150 x 100 inside, the rest beyond both edges
        fast = svs.read_region(*corner)
        monkeypatch.setattr(svs, "_fast_levels", [False] * svs.level_count)  # the general TIFF reader's path
        for region in (fast, svs.read_region(*corner), wsi.read_region(*corner)):
            assert region.shape == (200, 300, 3) and (region[100:] == 255).all() and (region[:, 150:] == 255).all()
            assert np.abs(region[:100, :150].astype(int) - fast[:100, :150]).mean() < 3  # DICOM: JPEG-encoded once more
            assert (region[:100, :150] < 250).any()  # the slide's own pixels, not a fill


def _noise_pyramid(path: Path, strips: bool) -> list[np.ndarray]:
    """A three-level pyramid (downsamples 1, 2 and 4) of noise, every level its own, so that a region read one level
    pixel off matches nothing; the coarser levels in tiles (the fast path) or in strips (tiffslide's)."""
    rng = np.random.default_rng(5)
    levels = [rng.integers(0, 256, (768 // d, 1024 // d, 3), dtype=np.uint8) for d in (1, 2, 4)]
    options = {"photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], subifds=2, tile=(64, 64), resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **({"rowsperstrip": 16} if strips else {"tile": (64, 64)}), **options)
    return levels


@pytest.mark.parametrize("strips", [False, True], ids=["tiled levels", "strip-stored levels"])
@pytest.mark.parametrize(
    "level, x0, y0, expected",
    [
        (2, 7, 13, (2, 3)),  # 1.75, 3.25: flooring would start a level pixel left
        (1, 5, 7, (3, 4)),  # 2.5, 3.5: halves up, both (Python's round takes 2.5 down to 2, 3.5 up to 4)
        (2, 1003, 13, (251, 3)),  # 250.75: 5 pixels of the slide, then white glass beyond its right edge
    ],
)
def test_a_region_at_a_coarser_level_starts_at_the_level_pixel_nearest_its_position(tmp_path, strips, level, x0, y0, expected):
    levels = _noise_pyramid(tmp_path / "pyramid.tif", strips)
    with open_slide(tmp_path / "pyramid.tif") as pyramid:
        assert pyramid.level_downsamples == [1.0, 2.0, 4.0] and pyramid._fast_levels[level] is not strips
        whole = np.asarray(pyramid.level_image(level))
        region = pyramid.read_region(x0, y0, level, (8, 8))
    np.testing.assert_array_equal(whole, levels[level])
    x, y = expected
    inside = whole[y : y + 8, x : x + 8]
    np.testing.assert_array_equal(region[:, : inside.shape[1]], inside)
    assert (region[:, inside.shape[1] :] == 255).all()
