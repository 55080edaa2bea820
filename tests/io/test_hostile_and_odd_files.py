"""Sizes claimed by a file are bounded before anything is allocated (deflated DICOM, palette colour output, slide
tiles and thumbnails), enhanced multi-frame images are rescaled and windowed from their functional groups (frame by
frame where they differ), multi-valued header fields read as DICOM writes them, and a slide left unclosed gives back its descriptors."""

from __future__ import annotations

import copy
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from medtriage.errors import ImageTooLargeError, InputError
from medtriage.io.decode_limits import DecodeLimits, default_limits, set_default_limits
from medtriage.io.dicom import read_dicom
from medtriage.io.ingest import ingest_site
from medtriage.io.site_key import SiteKey
from medtriage.io.slide_reader import open_slide

SIDE = 8192  # 64 MiB of 8-bit pixels, deflated to ~64 KB


def _deflated(side: int = SIDE) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID, ds.BurnedInAnnotation = "DX", "P1", "NO"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(side * side)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_deflated_file_is_refused_before_it_is_inflated_beyond_the_limits():
    data = _deflated()
    assert len(data) < 200_000

    def read():
        with pytest.raises(ImageTooLargeError):
            read_dicom(data, limits=DecodeLimits(max_decoded_bytes=1 << 20))

    assert _peak(read) < 32 << 20  # the 64 MiB data set is never held


def test_a_deflated_file_within_the_limits_still_decodes():
    image = read_dicom(get_testdata_file("image_dfl.dcm"))
    assert image.transfer_syntax == DeflatedExplicitVRLittleEndian
    assert image.pixels.shape[-2:] == (image.rows, image.columns)
    assert read_dicom(_deflated(64)).pixels.shape == (1, 1, 64, 64)


def test_ingest_quarantines_a_deflated_file_before_inflating_it(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "bomb.dcm").write_bytes(_deflated())
    previous = default_limits()
    set_default_limits(DecodeLimits(max_decoded_bytes=1 << 20))
    try:
        peak = _peak(lambda: ingest_site("a", site, tmp_path / "pool", key=SiteKey(b"k" * 32), progress=False))
    finally:
        set_default_limits(previous)
    assert peak < 32 << 20
    assert list((tmp_path / "pool-quarantine" / "a" / "too_large").iterdir())


def test_palette_colour_output_counts_three_channels_against_the_limit():
    path = get_testdata_file("OBXXXX1A.dcm")  # 600 x 800 PALETTE COLOR, one sample per pixel
    with pytest.raises(ImageTooLargeError, match="bytes of pixels"):
        read_dicom(path, limits=DecodeLimits(max_decoded_bytes=600 * 800 * 4 * 2))
    assert read_dicom(path, limits=DecodeLimits(max_decoded_bytes=600 * 800 * 4 * 3)).pixels.shape == (1, 3, 600, 800)


def test_a_slide_whose_tiles_claim_gigabytes_is_refused_before_any_tile_is_decoded(tmp_path: Path):
    path = tmp_path / "claim.tif"
    tifffile.imwrite(
        path,
        np.zeros((16, 16, 3), np.uint8),
        tile=(16, 16),
        photometric="rgb",
        compression="zlib",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    with tifffile.TiffFile(path, mode="r+b") as tif:  # a few hundred bytes that claim one 65536 x 65536 RGB tile (12 GiB)
        for name in ("ImageWidth", "ImageLength", "TileWidth", "TileLength"):
            tif.pages[0].tags[name].overwrite(65536)
    with pytest.raises(InputError, match="over the limit"):
        open_slide(path)


def _top_level_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same image with the shared functional groups' rescale and window written at the top level."""
    flat = copy.deepcopy(ds)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for macro in (shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]):
        for elem in macro:
            flat[elem.tag] = copy.deepcopy(elem)
    del flat.SharedFunctionalGroupsSequence
    return flat


def _decoded(ds: pydicom.Dataset) -> np.ndarray:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return read_dicom(buffer.getvalue()).pixels


def test_an_enhanced_ct_is_rescaled_and_windowed_from_its_functional_groups():
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))  # rescale and window only in the shared groups
    expected = _decoded(_top_level_copy(ds))
    assert expected.max() == 1.0  # the window (49 / 102 HU after a -1024 intercept) spans the display range
    np.testing.assert_array_equal(read_dicom(get_testdata_file("eCT_Supplemental.dcm")).pixels, expected)

    per_frame = copy.deepcopy(ds)  # the same values given frame by frame
    shared = per_frame.SharedFunctionalGroupsSequence[0]
    for item in per_frame.PerFrameFunctionalGroupsSequence:
        item.PixelValueTransformationSequence = copy.deepcopy(shared.PixelValueTransformationSequence)
        item.FrameVOILUTSequence = copy.deepcopy(shared.FrameVOILUTSequence)
    del shared.PixelValueTransformationSequence, shared.FrameVOILUTSequence
    np.testing.assert_array_equal(_decoded(per_frame), expected)


def test_rescale_and_window_that_differ_between_frames_are_applied_frame_by_frame():
    """Enhanced objects (PET, MR, CT reconstructions) may scale each frame differently: each frame must come out as
    the same frame would alone, with its own values at the top level."""
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    per_frame, frame_values = copy.deepcopy(ds), [("-1024", "49", "102"), ("-1000", "300", "1500")]
    shared = per_frame.SharedFunctionalGroupsSequence[0]
    for item, (intercept, center, width) in zip(per_frame.PerFrameFunctionalGroupsSequence, frame_values):
        item.PixelValueTransformationSequence = copy.deepcopy(shared.PixelValueTransformationSequence)
        item.PixelValueTransformationSequence[0].RescaleIntercept = intercept
        item.FrameVOILUTSequence = copy.deepcopy(shared.FrameVOILUTSequence)
        item.FrameVOILUTSequence[0].WindowCenter, item.FrameVOILUTSequence[0].WindowWidth = center, width
    del shared.PixelValueTransformationSequence, shared.FrameVOILUTSequence
    decoded = _decoded(per_frame)
    for index, (intercept, center, width) in enumerate(frame_values):
        alone = _top_level_copy(ds)
        alone.RescaleIntercept, alone.WindowCenter, alone.WindowWidth = intercept, center, width
        np.testing.assert_array_equal(decoded[index], _decoded(alone)[index])
        one = io.BytesIO()
        per_frame.save_as(one)
        np.testing.assert_array_equal(read_dicom(one.getvalue(), frame=index).pixels[0], decoded[index])


def test_header_readers_refuse_a_deflated_file_before_inflating_it():
    """The DICOM node reads each received instance's header, and the SR builder its sources': pydicom would inflate a
    deflated data set whole (pixels too) for either, however little of it they need."""
    from medtriage.serve.dicom_results import read_header
    from medtriage.serve.node.header import read_identity

    data, previous = _deflated(), default_limits()
    set_default_limits(DecodeLimits(max_decoded_bytes=1 << 20))
    try:
        for read in (lambda: read_identity(data), lambda: read_header(data)):

            def refused(read=read):
                with pytest.raises(ImageTooLargeError):
                    read()

            assert _peak(refused) < 32 << 20
    finally:
        set_default_limits(previous)
    assert read_header(_deflated(64)).Rows == 64  # within the limits: read as before


def test_the_slide_folder_probe_does_not_inflate_a_deflated_file(tmp_path: Path):
    """Telling whether a folder holds a DICOM whole-slide image reads one attribute of each file, but pydicom would
    inflate a deflated data set whole to find it."""
    from medtriage.io.slide_reader import is_dicom_wsi_file

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(_deflated())
    previous = default_limits()
    set_default_limits(DecodeLimits(max_decoded_bytes=1 << 20))
    try:
        assert _peak(lambda: is_dicom_wsi_file(bomb)) < 32 << 20
    finally:
        set_default_limits(previous)


def test_a_scanner_thumbnail_claiming_hundreds_of_megabytes_is_not_decoded(tmp_path: Path):
    """The tissue mask may start from the thumbnail the scanner stored; its tags (not its data) size the decode."""
    from tests.conftest import SAMPLES

    path = tmp_path / "claim.svs"
    path.write_bytes((SAMPLES / "CMU-1-Small-Region.svs").read_bytes())
    with open_slide(path) as slide:
        assert slide.scanner_thumbnail().size == (574, 768)  # as stored: the shortcut is taken
    with tifffile.TiffFile(path, mode="r+b") as tif:  # the 574 x 768 thumbnail (page 1) now claims 16 times each side
        thumbnail = tif.pages[1]
        for name in ("ImageWidth", "ImageLength"):
            thumbnail.tags[name].overwrite(thumbnail.tags[name].value * 16)  # ~340 MB of RGB, same aspect
    with open_slide(path) as slide:
        peak = _peak(lambda: slide.scanner_thumbnail())
        assert slide.scanner_thumbnail() is None
    assert peak < 64 << 20


def test_multi_valued_header_fields_read_as_dicom_writes_them():
    """Not as a Python list's text, which would reach scope messages and the pool manifest."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ViewPosition, ds.BodyPartExamined = ["PA", "LL"], ["CHEST", "ABDOMEN"]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    image = read_dicom(buffer.getvalue())
    assert (image.view_position, image.body_part) == ("PA\\LL", "CHEST\\ABDOMEN")


def test_a_slide_dropped_without_close_gives_its_file_descriptors_back():
    """A caller that forgets `close()` (or loses the slide to an exception) must not leak a descriptor per slide."""
    import gc
    import os

    from tests.conftest import SAMPLES

    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()
    before = open_descriptors()
    for _ in range(5):
        slide = open_slide(SAMPLES / "CMU-1-Small-Region.svs")
        slide.thumbnail(64)
        del slide
    gc.collect()
    assert open_descriptors() == before
