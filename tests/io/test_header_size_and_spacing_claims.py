"""Header claims that disagree with the pixels or with the DICOM value ranges, on pydicom's real test files."""

from __future__ import annotations

import io
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import DicomError
from medtriage.io.decode_limits import DecodeLimits
from medtriage.io.dicom import read_dicom


def sample_dataset(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return pydicom.dcmread(path)


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_a_false_samples_per_pixel_cannot_lift_the_decode_limits():
    # a 480 x 640 RGB JPEG 2000 frame under a header claiming 240 x 320 pixels of 12 samples: the same sample count
    ds = sample_dataset("US1_J2KR.dcm")
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 240, 320, 12, "RGB"
    limits = DecodeLimits(max_frame_pixels=240 * 320, max_decoded_bytes=240 * 320 * 3 * 4)
    with pytest.raises(DicomError, match="12 samples per pixel") as caught:
        read_dicom(encoded(ds), limits=limits)
    assert caught.value.where == "<bytes>" and "export the image again" in caught.value.hint


def test_pixels_that_decode_to_another_size_than_the_header_says_are_refused():
    ds = sample_dataset("JPEG-lossy.dcm")  # 12-bit JPEG Extended of 1024 x 256: only imagecodecs decodes it
    assert read_dicom(encoded(ds)).pixels.shape == (1, 1, 1024, 256)
    ds.Rows, ds.Columns = 256, 1024
    with pytest.raises(DicomError, match="1024 x 256, the header says 256 x 1024") as caught:
        read_dicom(encoded(ds))
    assert "does not match its header" in caught.value.hint


def test_an_infinite_pixel_spacing_is_no_spacing():
    ds = sample_dataset("CT_small.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the out-of-range value it is asked to write
        ds.PixelSpacing = ["1e400", "1e400"]  # parses as infinity
    ds.ImagerPixelSpacing = [0.2, 0.25]
    assert read_dicom(encoded(ds)).pixel_spacing == (0.2, 0.25)
    del ds.ImagerPixelSpacing
    assert read_dicom(encoded(ds)).pixel_spacing is None
