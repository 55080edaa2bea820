"""Structure claims of untrusted slide and JPEG 2000 files: a TIFF's chain of image directories (IFDs) that loops or
runs on for thousands of images, JPEG tiles declaring more pixels than their tile, and a reduced JPEG 2000 decode of a
codestream whose bits above Bits Stored differ across the image."""

from __future__ import annotations

import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile

from medtriage.errors import InputError
from medtriage.io.dicom import read_dicom
from medtriage.io.slide_reader import open_slide
from medtriage.io.tiff_structure import MAX_TIFF_PAGES
from tests.io.test_fallback_decoder_scope import unsigned_10_bit_with_a_high_bit_set
from tests.io.test_j2k_reduced import block_means
from tests.io.test_unused_bits_after_pydicom import with_pixels
from tests.memory import outcome_and_peak_bytes

pytest.importorskip("imagecodecs")

RESOLUTION = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}  # 0.5 µm/pixel
CMU1 = Path(__file__).resolve().parents[2] / "data" / "samples" / "CMU-1-Small-Region.svs"


def test_a_jpeg2000_codestream_with_bits_above_bits_stored_is_decoded_in_full(tmp_path):
    """An overlay in unused bit 11 over half the image: the full decode drops it, a reduced level would average it in."""
    ds, samples = unsigned_10_bit_with_a_high_bit_set()  # 128 x 128, Bits Stored 10
    samples = samples & 0x3FF
    samples[:, :64] |= 0x800
    path = with_pixels(ds, samples, tmp_path, "overlay", "jpeg-2000")  # codestream precision 16
    full = read_dicom(path)
    reduced = read_dicom(path, min_side=32)
    assert reduced.resolution_level == 0
    np.testing.assert_array_equal(reduced.pixels, full.pixels)


def test_a_jpeg2000_codestream_within_bits_stored_is_still_decoded_reduced(tmp_path):
    ds, samples = unsigned_10_bit_with_a_high_bit_set()
    ds.BitsStored, ds.HighBit = 16, 15  # every bit of the codestream is the value
    path = with_pixels(ds, samples, tmp_path, "all_bits", "jpeg-2000")
    reduced = read_dicom(path, min_side=32)
    assert reduced.resolution_level == 2
    expected = block_means(read_dicom(path).pixels[0, 0], 2)
    assert np.abs(reduced.pixels[0, 0] - expected).mean() < 0.02


def chained_copies(tmp_path: Path, copies: int, loop_to: int | None = None) -> Path:
    """A one-level tiled RGB slide whose image directory (IFD) is followed by `copies` copies of itself (their tag
    values stay where they are); with `loop_to`, the last copy links back to copy number `loop_to`."""
    base = tmp_path / "base.tif"
    pixels = np.full((256, 256, 3), (180, 90, 160), np.uint8)
    tifffile.imwrite(base, pixels, tile=(256, 256), photometric="rgb", **RESOLUTION)
    data = bytearray(base.read_bytes())
    first = struct.unpack_from("<I", data, 4)[0]
    ifd = bytes(data[first : first + 2 + 12 * struct.unpack_from("<H", data, first)[0]])
    step, start = len(ifd) + 4, len(data)
    struct.pack_into("<I", data, first + len(ifd), start)
    for copy in range(copies):
        last = copy == copies - 1
        following = (0 if loop_to is None else start + loop_to * step) if last else start + (copy + 1) * step
        data += ifd + struct.pack("<I", following)
    path = tmp_path / "chained.tif"
    path.write_bytes(data)
    return path


def open_within(path: Path, seconds: float) -> BaseException | None:
    """What opening the slide raised (None if it opened), failing the test when it does not finish in `seconds`."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            open_slide(path).close()
            outcome.append(None)
        except BaseException as err:  # handed to the test
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"opening the slide did not finish within {seconds} s"
    return outcome[0]


def test_an_ifd_chain_looping_back_after_a_hundred_images_is_refused_not_followed_for_ever(tmp_path):
    """tifffile looks for a loop only among the first 100 image directories: past them it would append offsets
    until memory runs out. The check runs in a child process, so a regression cannot leave a runaway thread."""
    import subprocess
    import sys

    path = chained_copies(tmp_path, 150, loop_to=0)
    code = (
        "import sys\nfrom medtriage.errors import InputError\nfrom medtriage.io.slide_reader import open_slide\n"
        "try:\n    open_slide(sys.argv[1]).close()\nexcept InputError as err:\n    print(err)"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("opening a slide whose image directories loop did not finish within 20 s")
    assert done.returncode == 0, done.stderr
    assert "chain of image directories loops back" in done.stdout and str(path) in done.stdout


def test_an_ifd_chain_looping_back_to_the_start_is_refused(tmp_path):
    err = open_within(chained_copies(tmp_path, 3, loop_to=1), 10)
    assert isinstance(err, InputError) and "loops back" in str(err)
    assert "copy the slide again" in err.hint


def test_a_file_with_more_images_than_a_slide_holds_is_refused_before_tifffile_sorts_them(tmp_path):
    """tifffile's series detection takes time quadratic in the number of images: 20000 copies of one directory
    (4 MB) took over a minute to open."""
    err = open_within(chained_copies(tmp_path, MAX_TIFF_PAGES), 10)  # with the original: one more than the limit
    assert isinstance(err, InputError) and f"more than {MAX_TIFF_PAGES} images" in str(err)


def test_a_chain_within_the_limit_still_opens(tmp_path):
    assert open_within(chained_copies(tmp_path, 20), 10) is None


def with_jpeg_size_claim(source: Path, path: Path, series: int, height: int, width: int) -> Path:
    """`source` with the frame header (SOF0) of the first JPEG chunk of `series` declaring `height` x `width`."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        page = tif.series[series].keyframe
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    sof = data.index(b"\xff\xc0", offset, offset + count)
    struct.pack_into(">HH", data, sof + 5, height, width)
    path.write_bytes(data)
    return path


def test_a_jpeg_tile_declaring_more_pixels_than_its_tile_is_refused_before_it_is_decoded(tmp_path):
    """Its 2 kB would otherwise be decoded into 48 MB first (declaring a 45000 pixel square: 6 GB, half a minute)."""
    colour = (180, 90, 160)
    base = tmp_path / "jpeg.tif"
    pixels = np.full((512, 512, 3), colour, np.uint8)
    tifffile.imwrite(base, pixels, tile=(256, 256), photometric="rgb", compression="jpeg", **RESOLUTION)
    path = with_jpeg_size_claim(base, tmp_path / "claims.tif", 0, 4000, 4000)
    with open_slide(path) as slide:
        assert np.abs(slide.read_region(256, 0, 0, (256, 256)).astype(int) - colour).max() < 8  # the other tiles read
        refused, peak = outcome_and_peak_bytes(lambda: slide.read_region(0, 0, 0, (256, 256)))
    assert isinstance(refused, InputError) and refused.where == str(path)
    assert "tile 0 declares 48000000 samples (height x width x components) in its JPEG header" in str(refused)
    assert peak < 16 << 20


def test_a_scanner_thumbnail_declaring_more_pixels_than_its_strips_is_skipped_without_decoding_it(tmp_path):
    path = with_jpeg_size_claim(CMU1, tmp_path / "thumbnail.svs", 1, 4000, 4000)
    with open_slide(path) as slide:
        thumbnail, peak = outcome_and_peak_bytes(slide.scanner_thumbnail)
    assert thumbnail is None and peak < 16 << 20
    with open_slide(CMU1) as intact:
        assert intact.scanner_thumbnail().size == (574, 768)


def test_a_jpeg_strip_declaring_more_pixels_than_its_strip_is_refused_before_it_is_decoded(tmp_path):
    """Strips are read through tiffslide, not the tile path: the same claim must be refused there too (48 MB decoded
    from 2 kB before)."""
    colour = (180, 90, 160)
    base = tmp_path / "strips.tif"
    tifffile.imwrite(base, np.full((512, 512, 3), colour, np.uint8), rowsperstrip=64, photometric="rgb", compression="jpeg", **RESOLUTION)
    path = with_jpeg_size_claim(base, tmp_path / "claims.tif", 0, 4000, 4000)
    with open_slide(path) as slide:
        assert np.abs(slide.read_region(0, 64, 0, (512, 448)).astype(int) - colour).max() < 8  # the other strips read
        refused, peak = outcome_and_peak_bytes(lambda: slide.read_region(0, 60, 0, (64, 8)))  # crosses strips 0 and 1
    assert isinstance(refused, InputError) and refused.where == str(path)
    assert "strip 0 declares 48000000 samples (height x width x components) in its JPEG header" in str(refused)
    assert peak < 16 << 20


def test_a_dicom_whole_slide_frame_declaring_more_pixels_than_its_tile_is_refused_before_it_is_decoded(dicom_wsi, tmp_path):
    """wsidicom decodes a frame at the size its JPEG header declares: before, the 48 MB were decoded (Pillow's memory,
    unseen by tracemalloc) and the read returned the corner of that image as if it were the tile."""
    folder = Path(shutil.copytree(dicom_wsi, tmp_path / "slide"))
    finest = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(finest.read_bytes())
    first_frame = data.index(b"\xff\xd8\xff", data.rindex(b"\xe0\x7f\x10\x00"))  # after the Pixel Data tag
    struct.pack_into(">HH", data, data.index(b"\xff\xc0", first_frame) + 5, 4000, 4000)
    finest.write_bytes(data)
    header = pydicom.dcmread(finest, stop_before_pixels=True)
    tile_width, tile_height = header.Columns, header.Rows
    with open_slide(folder) as slide:
        assert (slide.read_region(tile_width, 0, 0, (64, 64)) < 250).any()  # the other tiles read
        with pytest.raises(InputError) as refused:
            slide.read_region(0, 0, 0, (64, 64))
    assert refused.value.where == str(folder) and refused.value.hint
    assert (
        f"tile (0, 0) declares 48000000 samples (height x width x components) in its header, more than the {tile_height} x "
        f"{tile_width} x 3 of the slide's tiles; it was not decoded" in str(refused.value)
    )


def test_a_dicom_whole_slide_image_whose_frames_claim_hundreds_of_megabytes_is_refused_at_open(dicom_wsi, tmp_path):
    """One frame of 7 kB whose Rows, Columns and JPEG header agree on 12000 x 12000 pixels: before, it opened and each
    read of it decoded 432 MB (a TIFF slide's tiles of that size are refused at open)."""
    from pydicom.encaps import encapsulate, generate_frames

    folder = Path(shutil.copytree(dicom_wsi, tmp_path / "slide"))
    finest = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    dataset = pydicom.dcmread(finest)
    frame = bytearray(next(generate_frames(dataset.PixelData, number_of_frames=dataset.NumberOfFrames)))
    struct.pack_into(">HH", frame, frame.index(b"\xff\xc0") + 5, 12000, 12000)
    dataset.PixelData, dataset.NumberOfFrames, dataset.Rows, dataset.Columns = encapsulate([bytes(frame)]), 1, 12000, 12000
    dataset.save_as(finest)
    with pytest.raises(InputError) as refused:
        open_slide(folder)
    assert refused.value.where == str(folder) and "tiles of at most a few thousand pixels" in refused.value.hint
    assert "level 0 is stored in tiles (frames) of 12000 x 12000 x 3 samples (432000000 bytes each when decoded)" in str(refused.value)


def with_subifds(tmp_path: Path, count: int) -> Path:
    """A two-level OME-TIFF pyramid (its coarser level in a SubIFD) whose SubIFDs tag lists `count` SubIFDs, every
    one the coarser level's: 4 bytes of the file each, one pyramid level each to tifffile."""
    path = tmp_path / "subifds.ome.tif"
    pixels = np.full((512, 512, 3), (180, 90, 160), np.uint8)
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(pixels, tile=(256, 256), photometric="rgb", subifds=1, **RESOLUTION)
        tif.write(pixels[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    data = bytearray(path.read_bytes())
    first = struct.unpack_from("<I", data, 4)[0]
    entries = [first + 2 + 12 * i for i in range(struct.unpack_from("<H", data, first)[0])]
    entry = next(e for e in entries if struct.unpack_from("<H", data, e)[0] == 330)  # SubIFDs
    subifd = struct.unpack_from("<I", data, entry + 8)[0]
    if count > 1:  # the list moves to the end of the file
        struct.pack_into("<II", data, entry + 4, count, len(data))
        data += struct.pack(f"<{count}I", *[subifd] * count)
    path.write_bytes(data)
    return path


def test_a_file_listing_more_subifds_than_a_slide_holds_is_refused_before_tifffile_reads_them(tmp_path):
    """tifffile reads every SubIFD listed as one more pyramid level: 20000 of them (80 kB) took 3 s to open, and
    nothing bounded the count."""
    err = open_within(with_subifds(tmp_path, MAX_TIFF_PAGES), 10)  # with the main image: one more than the limit
    assert isinstance(err, InputError) and f"more than {MAX_TIFF_PAGES} images" in str(err)


@pytest.mark.parametrize("count", [1, 5])
def test_a_pyramid_in_subifds_within_the_limit_still_opens(tmp_path, count):
    with open_slide(with_subifds(tmp_path, count)) as slide:
        assert slide.level_count == 1 + count and slide.level_dimensions[1] == (256, 256)
