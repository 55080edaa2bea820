"""What a slide's levels claim, checked at open: pixels of every level (not only level 0), the shape of every level
against level 0, the files an OME-TIFF's XML names, and what a reader's cache of tiny tiles really holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medtriage.errors import InputError
from medtriage.io import slide_reader
from medtriage.io.slide_reader import open_slide
from tests.io.test_pathology import _repeated_tile_slide

PURPLE = (180, 90, 160)


def _tissue(height: int, width: int) -> np.ndarray:
    """Glass with a purple disc in the middle."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.full((height, width, 3), 235, np.uint8)
    image[((x - width / 2) / width) ** 2 + ((y - height / 2) / height) ** 2 < 0.1] = PURPLE
    return image


def _svs(path: Path, levels: list[np.ndarray], mpp: float = 0.25) -> Path:
    """An Aperio SVS: level 0, a thumbnail, then `levels[1:]` as the coarser levels (tiles of 256 pixels)."""
    height, width = levels[0].shape[:2]
    description = f"Aperio Image Library v10.0.0\r\n{width}x{height} [0,0 1x1] (256x256) JPEG/RGB Q=70|AppMag = 40|MPP = {mpp}"
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(256, 256), description=description, compression="zlib", metadata=None)
        tif.write(_tissue(64, 64), photometric="rgb", compression="zlib", metadata=None)
        for level in levels[1:]:
            photometric = "rgb" if level.ndim == 3 else "minisblack"
            tif.write(level, tile=(256, 256), photometric=photometric, compression="zlib", metadata=None)
    return path


@pytest.mark.parametrize(
    ("coarse", "held"),
    [
        (_tissue(1024, 1024).astype(np.uint16) * 250, "level 1 holds uint16 pixels, 3 sample"),
        (_tissue(1024, 1024)[..., 0], "level 1 holds uint8 pixels, 1 sample"),
    ],
    ids=["16-bit", "greyscale"],
)
def test_a_coarse_level_that_is_not_8_bit_rgb_is_refused_at_open(tmp_path, coarse, held):
    """Only level 0 was checked: 16-bit tiles of a coarser level were cast to 8 bits (wrapped) and scored, greyscale
    ones failed as 'cannot decode slide tile data' (the file may be damaged)."""
    path = _svs(tmp_path / "mixed.svs", [_tissue(2048, 2048), coarse, _tissue(512, 512)])
    with pytest.raises(InputError, match=f"not an 8-bit RGB brightfield slide: {held}") as refused:
        open_slide(path)
    assert str(path) in str(refused.value) and "8-bit RGB" in refused.value.hint


def test_a_level_shaped_unlike_level_0_is_refused_at_open(tmp_path):
    """Tiles are placed on a level by one factor (the mean of width's and height's): a level a quarter as wide but as
    high as level 0 was read at the wrong rows, and a tile over the tissue read as glass, without an error."""
    path = _svs(tmp_path / "squashed.svs", [_tissue(2048, 2048), _tissue(2048, 512), _tissue(512, 512)])
    with pytest.raises(InputError, match=r"level 1 \(512 x 2048 pixels\) is not level 0 \(2048 x 2048\) shrunk alike"):
        open_slide(path, mpp=0.2)  # 0.2 µm/pixel: tiles of 0.5 µm/pixel would come from level 1


def test_levels_padded_to_whole_tiles_still_open(tmp_path):
    """Some scanners (Philips) pad each level up to whole tiles: 1000 x 500 stored as 1024 x 512."""
    path = _svs(tmp_path / "padded.svs", [_tissue(1000, 2000), _tissue(512, 1024), _tissue(256, 512)])
    with open_slide(path) as slide:
        assert slide.level_dimensions == [(2000, 1000), (1024, 512), (512, 256)]


def test_an_ome_tiff_naming_another_file_is_read_from_its_own_file_only(tmp_path):
    """tifffile opened the file an OME-XML UUID names (a path relative to the slide, `../` allowed) and served its
    pages as this slide's levels: another slide's tissue scored under this one's name."""
    other = tmp_path / "other_patient" / "slide.ome.tif"
    other.parent.mkdir()
    tifffile.imwrite(other, _tissue(512, 512), tile=(256, 256), photometric="rgb", ome=True)
    with tifffile.TiffFile(other) as tif:
        uuid = tif.ome_metadata.split('UUID="')[1].split('"')[0]
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'UUID="urn:uuid:00000000-0000-0000-0000-000000000001"><Image ID="Image:0"><Pixels DimensionOrder="XYCZT" '
        'ID="Pixels:0" Interleaved="true" SizeC="3" SizeT="1" SizeX="512" SizeY="512" SizeZ="1" Type="uint8" '
        'PhysicalSizeX="0.5" PhysicalSizeY="0.5"><Channel ID="Channel:0:0" SamplesPerPixel="3"/>'
        f'<TiffData IFD="0" PlaneCount="1"><UUID FileName="../other_patient/slide.ome.tif">{uuid}</UUID></TiffData>'
        "</Pixels></Image></OME>"
    )
    path = tmp_path / "inbox" / "slide.ome.tif"
    path.parent.mkdir()
    glass = np.full((512, 512, 3), 240, np.uint8)
    tifffile.imwrite(path, glass, tile=(256, 256), photometric="rgb", description=xml, metadata=None)
    with open_slide(path) as slide:
        assert {Path(page.parent.filehandle.path) for page in slide._levels[0].pages} == {path}
        assert slide.mpp == 0.5  # the XML's resolution still serves
        assert (slide.read_region(0, 0, 0, (512, 512)) == glass).all()


def _tiny_tile_slide(path: Path, side: int) -> Path:
    """A classic TIFF of `side` x `side` pixels stored in 1 x 1 pixel tiles, all pointing at one deflated pixel."""
    return _repeated_tile_slide(path, side, tile=1, pixels=bytes(PURPLE))


def test_a_cache_of_tiny_tiles_stays_within_its_budget_in_memory(tmp_path, monkeypatch):
    """The budget counted pixels only: 1 x 1 pixel tiles (3 bytes each, 500 with their array and entry) let a 1 MB file
    fill a 128 MB budget with tens of millions of entries, gigabytes of memory."""
    budget = 1 << 20
    monkeypatch.setattr(slide_reader, "TILE_CACHE_BYTES", budget)
    path = _tiny_tile_slide(tmp_path / "tiny.tif", 128)  # 16,384 tiles
    with open_slide(path) as slide:
        reader = slide.shared_reader
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            region = reader.read(0, 0, 0, (128, 128))
            assert (region == PURPLE).all()
            del region
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert held < 2 * budget, f"the tile cache holds {held} bytes for a budget of {budget}"


# --- DICOM whole-slide images ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dicom_pyramid(tmp_path_factory) -> Path:
    """A three-level pyramid (2048, 1024, 512 pixels; frames of 256) converted to a DICOM whole-slide image."""
    pytest.importorskip("wsidicom", reason="pip install 'medtriage[wsi]'")
    folder = tmp_path_factory.mktemp("dicom_pyramid")
    source = _svs(folder / "pyramid.svs", [_tissue(2048, 2048), _tissue(1024, 1024), _tissue(512, 512)])
    # In a child process: importing wsidicomizer changes how pydicom decodes pixel data for the whole process.
    convert = (
        "import sys; from wsidicomizer import WsiDicomizer; from wsidicomizer.sources import TiffSlideSource; "
        "WsiDicomizer.convert(sys.argv[1], sys.argv[2], tile_size=256, preferred_source=TiffSlideSource)"
    )
    done = subprocess.run([sys.executable, "-c", convert, str(source), str(folder / "dicom")], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named 'wsidicomizer'" in done.stderr:
        pytest.skip("pip install wsidicomizer (in the dev extra)")
    assert done.returncode == 0, done.stderr
    return folder / "dicom"


def _with_level_1_changed(dicom_pyramid: Path, folder: Path, change) -> Path:
    """A copy of the pyramid whose 1024-pixel level is passed through `change(dataset)`."""
    import pydicom

    shutil.copytree(dicom_pyramid, folder)
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        if dataset.ImageType[2] == "VOLUME" and dataset.TotalPixelMatrixColumns == 1024:
            change(dataset)
            dataset.save_as(path)
    return folder


def test_the_dicom_pyramid_opens_with_its_three_levels(dicom_pyramid):
    with open_slide(dicom_pyramid) as slide:
        assert slide.level_dimensions == [(2048, 2048), (1024, 1024), (512, 512)]


def test_a_coarse_dicom_level_that_is_not_rgb_is_refused_at_open(dicom_pyramid, tmp_path):
    """Only level 0 was checked: tiles of a MONOCHROME2 level came out grey and were scored."""

    def monochrome(dataset):
        dataset.PhotometricInterpretation, dataset.SamplesPerPixel = "MONOCHROME2", 1

    folder = _with_level_1_changed(dicom_pyramid, tmp_path / "slide", monochrome)
    with pytest.raises(InputError, match="not an 8-bit RGB brightfield slide: level 1 holds 8-bit pixels, 1 sample"):
        open_slide(folder)


def test_a_dicom_level_shaped_unlike_level_0_is_refused_at_open(dicom_pyramid, tmp_path):
    """A DICOM level's factor came from its width alone: a level of a quarter of its height read its lower tiles as
    glass beyond its edge, without an error."""
    from pydicom.encaps import encapsulate, generate_frames

    def squashed(dataset):  # the first row of frames only: 1024 x 256 pixels
        frames = list(generate_frames(dataset.PixelData, number_of_frames=int(dataset.NumberOfFrames)))[:4]
        dataset.TotalPixelMatrixRows, dataset.NumberOfFrames = 256, 4
        dataset.PixelData = encapsulate(frames)
        dataset["PixelData"].VR = "OB"
        dataset["PixelData"].is_undefined_length = True

    folder = _with_level_1_changed(dicom_pyramid, tmp_path / "slide", squashed)
    with pytest.raises(InputError, match=r"level 1 \(1024 x 256 pixels\) is not level 0 \(2048 x 2048\) shrunk alike"):
        open_slide(folder, mpp=0.2)
