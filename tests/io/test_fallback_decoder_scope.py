"""The imagecodecs decoder stands in for pydicom's plugins on a codestream they cannot read, never for a pixel
description pydicom refuses; what it hands back holds only the bits the header says are stored, as pydicom's do."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGExtended12Bit

from medtriage.errors import DicomError
from medtriage.io.dicom import read_dicom
from tests.io.test_pixel_values_from_headers import as_jpeg_extended_only_imagecodecs_reads, ct_small, encoded, signed_12_bit_ct


def reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(encoded(ds)))


@pytest.mark.parametrize(
    ("attribute", "value", "named"),
    [
        ("BitsStored", 20, "Bits Stored"),  # more bits stored than allocated
        ("BitsAllocated", 12, "Bits Allocated"),  # not a whole number of bytes
        ("PhotometricInterpretation", "MONOCHROME3", "Photometric Interpretation"),
        ("PixelRepresentation", 2, "Pixel Representation"),
        ("BitsStored", None, "Bits Stored"),  # a required attribute left out
        ("PixelRepresentation", None, "Pixel Representation"),
    ],
    ids=[
        "bits-stored-above-allocated",
        "bits-allocated-12",
        "unknown-photometric",
        "pixel-representation-2",
        "no-bits-stored",
        "no-pixel-representation",
    ],
)
def test_a_pixel_description_pydicom_refuses_is_not_decoded_by_imagecodecs(attribute, value, named):
    pytest.importorskip("imagecodecs")
    ds = reread(as_jpeg_extended_only_imagecodecs_reads(signed_12_bit_ct()))
    if value is None:
        delattr(ds, attribute)
    else:
        setattr(ds, attribute, value)
    with pytest.raises(DicomError, match=f"invalid pixel description: .*{named}") as caught:
        read_dicom(encoded(ds))
    assert caught.value.where == "<bytes>" and "source system" in caught.value.hint


def unsigned_10_bit_with_a_high_bit_set() -> tuple[pydicom.Dataset, np.ndarray]:
    """CT_small rescaled to 10-bit unsigned values 100..900, and those values with unused bit 11 set (as an overlay
    kept in the pixel data would): what a 12-bit JPEG carries."""
    ds = ct_small()
    ct = ds.pixel_array.astype(np.int32)
    values = (100 + (ct - ct.min()) * 800 // (ct.max() - ct.min())).astype(np.uint16)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 10, 9, 0, 0
    ds.PixelData = values.tobytes()
    return ds, values | 0x800


def as_12_bit_jpeg(ds: pydicom.Dataset, samples: np.ndarray, *, pydicom_reads_it: bool) -> pydicom.Dataset:
    """`ds` with `samples` as 12-bit JPEG Extended; unless `pydicom_reads_it`, its scan header ends at coefficient 0
    instead of 63 (as in tests.io.test_pixel_values_from_headers), which only imagecodecs decodes."""
    import imagecodecs

    stream = bytearray(imagecodecs.jpeg8_encode(samples, level=100, bitspersample=12))
    if not pydicom_reads_it:
        stream[stream.find(b"\xff\xda") + 8] = 0  # Se: 63 -> 0
    compressed = reread(ds)
    compressed.PixelData = encapsulate([bytes(stream)])
    compressed.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    return compressed


def test_unsigned_bits_above_bits_stored_are_cleared_as_pydicom_clears_them():
    pytest.importorskip("imagecodecs")
    ds, samples = unsigned_10_bit_with_a_high_bit_set()
    by_pydicom = as_12_bit_jpeg(ds, samples, pydicom_reads_it=True)
    assert by_pydicom.pixel_array.max() < 1024  # pydicom's plugins clear the bits above Bits Stored
    only_imagecodecs = as_12_bit_jpeg(ds, samples, pydicom_reads_it=False)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="scan stop must be 63"):
        warnings.simplefilter("ignore")
        only_imagecodecs.pixel_array  # noqa: B018 - pydicom's own decoders cannot read it

    expected = read_dicom(encoded(by_pydicom)).pixels
    assert expected.max() < 0.95  # the stored range is 0..1023: values up to 900 do not saturate
    np.testing.assert_allclose(read_dicom(encoded(only_imagecodecs)).pixels, expected, atol=2 / 1023)
    np.testing.assert_allclose(expected, read_dicom(encoded(ds)).pixels, atol=2 / 1023)  # and as the uncompressed image
