"""JPEG 2000 decoded at a coarser resolution level when the caller needs fewer pixels: real CR files, and one with
marker segments added before its coding style segment (any number of comments is legal; the walk to it is bounded)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medtriage.errors import DicomError
from medtriage.io.decode_limits import MAX_HEADER_SEGMENTS
from medtriage.io.dicom import read_dicom
from tests.io.test_dicom import sample_file


def block_means(pixels: np.ndarray, level: int) -> np.ndarray:
    k = 2**level
    h, w = pixels.shape[0] // k * k, pixels.shape[1] // k * k
    return pixels[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm"])
def test_a_large_jpeg2000_image_is_decoded_at_the_coarsest_level_that_is_large_enough(name):
    path = sample_file(name)
    full = read_dicom(path)
    reduced = read_dicom(path, min_side=200)
    level = reduced.resolution_level
    h, w = reduced.pixels.shape[-2:]
    assert level >= 2 and (h, w) == (-(-full.rows // 2**level), -(-full.columns // 2**level))
    assert min(h, w) >= 200 and min(-(-h // 2), -(-w // 2)) < 200  # one level coarser would be too small
    assert (reduced.rows, reduced.columns) == (full.rows, full.columns) and full.resolution_level == 0  # header facts stay
    # the low-pass band is the image smoothed: close to the full decode averaged over 2^level x 2^level blocks
    expected = block_means(full.pixels[0, 0], level)
    assert np.abs(reduced.pixels[0, 0, : expected.shape[0], : expected.shape[1]] - expected).mean() < 0.02


def test_full_decode_where_no_level_is_small_enough_or_the_file_is_not_jpeg2000():
    j2k = sample_file("RG3_J2KR.dcm")
    rows = pydicom.dcmread(j2k, stop_before_pixels=True).Rows
    assert read_dicom(j2k, min_side=rows).resolution_level == 0
    np.testing.assert_array_equal(read_dicom(j2k, min_side=rows).pixels, read_dicom(j2k).pixels)
    plain = sample_file("RG1_UNCI.dcm")
    np.testing.assert_array_equal(read_dicom(plain, min_side=16).pixels, read_dicom(plain).pixels)


def test_signed_or_multi_component_jpeg2000_is_decoded_in_full():
    assert read_dicom(sample_file("MR_small_jp2klossless.dcm"), min_side=8).resolution_level == 0  # signed
    assert read_dicom(sample_file("US1_J2KR.dcm"), min_side=8).resolution_level == 0  # colour


def with_segments_before_cod(tmp_path: Path, segments: bytes) -> Path:
    """RG1_J2KR.dcm with `segments` between its codestream's SIZ and COD marker segments."""
    ds = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    (codestream,) = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    after_siz = 4 + struct.unpack_from(">H", codestream, 4)[0]
    ds.PixelData = pydicom.encaps.encapsulate([codestream[:after_siz] + segments + codestream[after_siz:]])
    ds.save_as(tmp_path / "segments.dcm")
    return tmp_path / "segments.dcm"


def comments(count: int) -> bytes:
    """`count` comment (COM) marker segments: Lcom, Rcom (1 = Latin-1 text), the text."""
    return b"\xff\x64\x00\x07\x00\x01abc" * count


def test_comment_segments_before_the_coding_style_are_stepped_over(tmp_path):
    path = with_segments_before_cod(tmp_path, comments(100))
    reduced = read_dicom(path, min_side=200)
    assert reduced.resolution_level >= 2
    np.testing.assert_array_equal(reduced.pixels, read_dicom(sample_file("RG1_J2KR.dcm"), min_side=200).pixels)


@pytest.mark.parametrize(
    ("segments", "reason"),
    [
        (comments(MAX_HEADER_SEGMENTS), f"no JPEG 2000 coding style segment \\(COD\\) within its first {MAX_HEADER_SEGMENTS}"),
        (b"\xff\x64\x00\x00", "a JPEG 2000 marker segment of length 0"),
        (b"\x00\x00\x00\x07\x00\x01abc", "no JPEG 2000 marker segment at byte 45"),
    ],
    ids=["too-many-segments", "zero-length", "not-a-marker"],
)
def test_a_main_header_that_cannot_be_walked_to_its_coding_style_is_refused_naming_the_file(tmp_path, segments, reason):
    path = with_segments_before_cod(tmp_path, segments)
    with pytest.raises(DicomError, match=f"frame 1 has {reason}") as refused:
        read_dicom(path, min_side=200)
    assert refused.value.where == str(path)


def test_a_jpeg2000_header_that_cannot_be_walked_is_refused_as_undecodable_pixel_data(tmp_path):
    path = with_segments_before_cod(tmp_path, b"\xff\x64\x00\x00")  # a marker segment of length 0 before COD
    with pytest.raises(DicomError) as refused:
        read_dicom(path, min_side=200)
    assert refused.value.reason.startswith("cannot decode pixel data: frame 1 has a JPEG 2000 marker segment of length 0")
    assert refused.value.where == str(path)
    assert "export the image again" in refused.value.hint and "header" not in refused.value.hint
