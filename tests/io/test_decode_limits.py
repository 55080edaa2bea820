"""Sizes a header claims are bounded before anything is decoded: a typed ImageTooLargeError."""

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import DicomError, ImageTooLargeError
from medtriage.io.decode_limits import DecodeLimits, default_limits, set_default_limits
from medtriage.io.dicom import read_dicom


def _with(name: str, **attributes) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_a_small_compressed_file_claiming_a_huge_frame_is_refused_before_decoding():
    data = _with("JPEG2000.dcm", Rows=60000, Columns=60000)
    assert len(data) < 200_000
    with pytest.raises(ImageTooLargeError, match="pixels per frame"):
        read_dicom(data)


def test_too_many_frames_and_too_many_decoded_bytes_are_refused():
    with pytest.raises(ImageTooLargeError, match="frames exceed"):
        read_dicom(_with("emri_small.dcm", NumberOfFrames=100_000))
    with pytest.raises(ImageTooLargeError, match="bytes of pixels"):
        read_dicom(get_testdata_file("emri_small.dcm"), limits=DecodeLimits(max_decoded_bytes=64 * 64 * 4 * 5))
    assert read_dicom(get_testdata_file("emri_small.dcm"), frame=0, limits=DecodeLimits(max_decoded_bytes=64 * 64 * 4)).frames == 1


def test_limits_are_configurable_per_call_and_per_process():
    small = DecodeLimits(max_frame_pixels=100)
    with pytest.raises(ImageTooLargeError):
        read_dicom(get_testdata_file("CT_small.dcm"), limits=small)
    previous = default_limits()
    set_default_limits(small)
    try:
        with pytest.raises(ImageTooLargeError):
            read_dicom(get_testdata_file("CT_small.dcm"))
    finally:
        set_default_limits(previous)
    assert read_dicom(get_testdata_file("CT_small.dcm")).pixels.shape == (1, 1, 128, 128)


def test_a_codestream_larger_than_its_header_is_refused():
    data = _with("JPEG2000.dcm", Rows=16, Columns=16)  # the JPEG 2000 frame itself says 1024 x 256
    with pytest.raises(DicomError, match="compressed frame declares"):
        read_dicom(data)


def test_nonsense_sizes_are_typed_errors():
    for attributes in ({"Rows": 0}, {"NumberOfFrames": -3}):
        with pytest.raises(DicomError):
            read_dicom(_with("CT_small.dcm", **attributes))
    assert np.isfinite(read_dicom(get_testdata_file("CT_small.dcm")).pixels).all()


def _with_frame_count(name: str, count: bytes) -> bytes:
    """pydicom's sample `name` with Number of Frames written as `count`, byte for byte (pydicom would refuse to write
    some of these values)."""
    data = _with(name, NumberOfFrames="7777777")
    return data.replace(b"7777777 ", count.ljust(8))


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # pydicom's notes on 2.5 and abc; the refusal says it
@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"])
@pytest.mark.parametrize(
    ("count", "reason"),
    [
        (b"0", r"image claims 64 x 64 pixels, 0 frame\(s\)"),
        (b"-0", r"image claims 64 x 64 pixels, 0 frame\(s\)"),
        (b"00", r"image claims 64 x 64 pixels, 0 frame\(s\)"),
        (b"2.5", r"malformed image size attributes \(Number of Frames 2.5 is not a whole number\)"),
        (b"abc", r"malformed image size attributes \(invalid literal"),
    ],
)
def test_a_number_of_frames_that_counts_no_frame_or_is_no_whole_number_is_refused(name, count, reason):
    """Before, a count of 0 was read as 1 (one frame of ten decoded from the JPEG 2000 file, all ten from the RLE one,
    without a word) and 2.5 as 2."""
    with pytest.raises(DicomError, match=reason) as refused:
        read_dicom(_with_frame_count(name, count))
    assert refused.value.where == "<bytes>" and refused.value.hint


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # 10.0 is not how IS writes 10
def test_a_number_of_frames_written_otherwise_but_whole_still_reads():
    for count in (b"10", b"+10", b" 10", b"10.0"):
        assert read_dicom(_with_frame_count("emri_small_jpeg_2k_lossless.dcm", count)).frames == 10
