"""Stored pixels to display values as the header says: signed data through the imagecodecs decoder, the rescale
slope and the choice of window."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGExtended12Bit

from medtriage.errors import DicomError
from medtriage.io.dicom import read_dicom


def ct_small() -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file("CT_small.dcm")  # signed 16-bit CT, stored values 128..2191, intercept -1024
    if path is None:
        pytest.skip("pydicom test file CT_small.dcm not available")
    return pydicom.dcmread(path)


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the odd values some tests write on purpose
        ds.save_as(buffer)
    return buffer.getvalue()


def signed_12_bit_ct() -> pydicom.Dataset:
    """CT_small stored as 12-bit signed Hounsfield units (air and lung below zero), uncompressed."""
    ds = ct_small()
    hounsfield = ds.pixel_array.astype(np.int16) - 1024
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 1, 0
    ds.PixelData = hounsfield.tobytes()
    return ds


def as_jpeg_extended_only_imagecodecs_reads(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds` as 12-bit JPEG Extended whose scan header ends at coefficient 0 instead of 63, as some writers do
    (pydicom's JPEG-lossy.dcm): libjpeg-turbo (imagecodecs) decodes it, pydicom's plugins refuse it."""
    import imagecodecs

    two_complement = (ds.pixel_array.astype(np.int32) & 0xFFF).astype(np.uint16)  # how JPEG carries signed samples
    stream = bytearray(imagecodecs.jpeg8_encode(two_complement, level=100, bitspersample=12))
    scan = stream.find(b"\xff\xda")
    stream[scan + 8] = 0  # Se: 63 -> 0
    ds.PixelData = encapsulate([bytes(stream)])
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    with pytest.raises(RuntimeError, match="scan stop must be 63"):
        ds.pixel_array  # noqa: B018 - pydicom's own decoders cannot read it
    return ds


def test_signed_pixels_decoded_by_imagecodecs_keep_their_sign():
    pytest.importorskip("imagecodecs")
    reference = read_dicom(encoded(signed_12_bit_ct())).pixels
    compressed = read_dicom(encoded(as_jpeg_extended_only_imagecodecs_reads(signed_12_bit_ct()))).pixels
    assert reference.min() < 0.5 - 800 / 4095  # air at about -900 HU is dark
    np.testing.assert_allclose(compressed, reference, atol=0.002)  # near-lossless JPEG: within 8 of 4095


def test_a_zero_rescale_slope_is_refused():
    ds = ct_small()
    ds.RescaleSlope = "0"  # every pixel would map to the intercept: the real-world values are unknown
    with pytest.raises(DicomError, match="Rescale Slope is 0") as caught:
        read_dicom(encoded(ds))
    assert caught.value.where == "<bytes>" and "rescale" in caught.value.hint


@pytest.mark.parametrize(
    ("center", "width"),
    [("\\40", "\\400"), ("50\\40", "\\400"), ("0\\40", "0\\400"), ("-600\\40", "-1\\400")],
    ids=["first-pair-empty", "first-width-empty", "first-width-zero", "first-width-negative"],
)
def test_the_first_usable_window_is_applied(center, width):
    ds = ct_small()
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    expected = read_dicom(encoded(ds)).pixels
    ds.WindowCenter, ds.WindowWidth = center, width
    np.testing.assert_array_equal(read_dicom(encoded(ds)).pixels, expected)


def test_no_usable_window_shows_the_stored_range():
    ds = ct_small()
    unwindowed = read_dicom(encoded(ds)).pixels
    ds.WindowCenter, ds.WindowWidth = "\\40", "0\\"
    np.testing.assert_array_equal(read_dicom(encoded(ds)).pixels, unwindowed)
