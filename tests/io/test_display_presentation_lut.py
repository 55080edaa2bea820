"""Display through a Presentation LUT Sequence (PS3.3 C.11.6): the VOI output scaled onto the table's entries, its
P-Values scaled by the bits the entries use, never inverted again for MONOCHROME1; damaged sequences refused."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian

from medtriage.errors import DicomError
from medtriage.io.dicom import read_dicom
from tests.io.test_dicom import make_dataset

RAMP = np.arange(4096).reshape(64, 64)  # every 12-bit stored value once
S = RAMP.ravel().astype(np.float64)  # the stored values, for the expected pixels
DOWN = [4095 - i for i in range(4096)]  # an inverting table of 12-bit entries


def _item(entries: list[int], bits: int, count: int | None = None) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(entries) if count is None else count, 0, bits])  # LUT Descriptor
    item.add_new(0x00283006, "US", entries)  # LUT Data
    return item


def _file(items: list[Dataset], **attributes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dataset(RAMP, 12, **attributes)))
    ds.PresentationLUTSequence = Sequence(items)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return read_dicom(data).pixels[0, 0].ravel()


@pytest.mark.parametrize(
    "entries, bits, expected",
    [
        (list(range(1024)), 10, np.rint(S * 1023 / 4095) / 1023),
        (list(range(256)), 8, np.rint(S * 255 / 4095) / 255),
        ([v // 16 for v in range(4096)], 8, (S // 16) / 255),  # 8-bit entries, more than 256 of them
    ],
    ids=["1024-ramp", "256-ramp", "4096-entries-of-8-bits"],
)
def test_a_ramp_table_maps_the_voi_output_range_onto_its_entries(entries, bits, expected):
    """PS3.3 C.11.6.1: the output range of VOI (here the stored range, 0..4095) is scaled linearly onto the table's
    input range, so value s takes entry rint(s / 4095 * (entries - 1)). The sequence was ignored (s / 4095). Without
    a VOI the image would take the affine path, which knows no table."""
    np.testing.assert_allclose(_pixels(_file([_item(entries, bits)])), expected, atol=1e-6)


def test_an_inverting_table_inverts():
    np.testing.assert_allclose(_pixels(_file([_item(DOWN, 12)])), 1.0 - S / 4095, atol=1e-6)


def test_the_table_maps_the_output_of_a_window():
    """A LINEAR_EXACT window of center 2048, width 4096 gives s / 4096 (exact in float32); 256 entries take
    rint(s / 4096 * 255)."""
    data = _file([_item(list(range(256)), 8)], WindowCenter=2048, WindowWidth=4096, VOILUTFunction="LINEAR_EXACT")
    np.testing.assert_allclose(_pixels(data), np.rint(S * 255 / 4096) / 255, atol=1e-6)


def test_the_table_maps_the_output_of_a_voi_lut():
    """VOI LUT min(2s, 4095) of 12 bits, then the inverting table: 1 - min(2s, 4095) / 4095."""
    voi = _item([min(2 * v, 4095) for v in range(4096)], 12)
    data = _file([_item(DOWN, 12)], VOILUTSequence=Sequence([voi]))
    np.testing.assert_allclose(_pixels(data), 1.0 - np.minimum(2 * S, 4095) / 4095, atol=1e-6)


@pytest.mark.parametrize(
    "entries, expected",
    [
        ([v // 16 for v in range(4096)], (S // 16) / 255),
        ([v * 255 // 4095 for v in range(4096)], np.floor(S * 255 / 4095) / 255),
    ],
    ids=["4096-entries", "4096-entries-floor"],
)
def test_a_table_stating_16_bits_for_8_bit_entries_is_scaled_by_8_bits(entries, expected):
    """Scaled by 2^16 - 1, such a table would show the image near black (PS3.3 C.11.1.1, `_lut_bits`)."""
    np.testing.assert_allclose(_pixels(_file([_item(entries, 16)])), expected, atol=1e-6)


def test_a_descriptor_of_0_entries_means_65536():
    """Value s takes entry rint(s * 65535 / 4095) = 16 s + rint(s / 273), whose value is 4095 - s. (65536 entries
    are too long for US in an explicit VR file: OW.)"""
    item = Dataset()
    item.add_new(0x00283002, "US", [0, 0, 16])
    item.add_new(0x00283006, "OW", (4095 - np.arange(65536) // 16).astype("<u2").tobytes())
    np.testing.assert_allclose(_pixels(_file([item])), 1.0 - S / 4095, atol=1e-6)


def _big_endian_file(table: np.ndarray) -> bytes:
    """The ramp in Explicit VR Big Endian with the table as OW: 16-bit words in the file's byte order."""
    ds = pydicom.dcmread(io.BytesIO(make_dataset(RAMP, 12)))
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = RAMP.astype(">u2").tobytes()
    item = Dataset()
    item.add_new(0x00283002, "US", [len(table), 0, 12])
    item.add_new(0x00283006, "OW", table.astype(">u2").tobytes())
    ds.PresentationLUTSequence = Sequence([item])
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    return buffer.getvalue()


def test_a_big_endian_ow_table_is_read_in_the_files_byte_order():
    """Read little-endian, entry 4095 - s (0x0FFF -> 0xFF0F) would come out as garbage far above 12 bits."""
    data = _big_endian_file(np.array(DOWN))
    assert pydicom.dcmread(io.BytesIO(data)).original_encoding == (False, False)
    np.testing.assert_allclose(_pixels(data), 1.0 - S / 4095, atol=1e-6)


@pytest.mark.parametrize(
    "photometric, shape",
    [("MONOCHROME1", None), ("MONOCHROME1", "INVERSE"), ("MONOCHROME1", "IDENTITY"), ("MONOCHROME2", "INVERSE")],
)
def test_the_tables_p_values_are_not_inverted_again(photometric, shape):
    """The table's output is P-Values, minimum black, whatever the Photometric Interpretation (PS3.3 C.11.6.1,
    PS3.4 N.2.1.4); the table replaces a Presentation LUT Shape given with it. MONOCHROME1 or INVERSE inverted
    the image (1 - s / 4095) and the table was ignored."""
    attributes = {"PhotometricInterpretation": photometric}
    if shape is not None:
        attributes["PresentationLUTShape"] = shape
    data = _file([_item(list(range(1024)), 10)], **attributes)
    np.testing.assert_allclose(_pixels(data), np.rint(S * 1023 / 4095) / 1023, atol=1e-6)


def _without(keyword: str) -> Dataset:
    item = _item(DOWN, 12)
    delattr(item, keyword)
    return item


@pytest.mark.parametrize(
    "items, reason",
    [
        ([], "0 items"),
        ([_item(DOWN, 12), _item(DOWN, 12)], "2 items"),
        ([_without("LUTDescriptor")], "LUTDescriptor"),
        ([_without("LUTData")], "LUTData"),
        ([_item(DOWN[:100], 12, count=4096)], "holds 100 entries, the LUT Descriptor claims 4096"),
        ([_item(DOWN, 12, count=0)], "holds 4096 entries, the LUT Descriptor claims 65536"),
        ([_item(DOWN, 9)], "9 bits per LUT entry"),
    ],
    ids=["no-item", "two-items", "no-descriptor", "no-data", "fewer-entries", "0-entries", "9-bits"],
)
@pytest.mark.parametrize("shape", [None, "IDENTITY"])
def test_a_damaged_sequence_is_a_dicom_error_that_says_what_to_do(items, reason, shape):
    """It was ignored; with a Presentation LUT Shape beside it, it is still refused (the table wins, and a damaged
    one says the header is not what its writer meant)."""
    attributes = {} if shape is None else {"PresentationLUTShape": shape}
    with pytest.raises(DicomError, match="invalid Presentation LUT Sequence") as info:
        read_dicom(_file(items, **attributes), name="image.dcm")
    assert reason in info.value.reason
    assert info.value.where == "image.dcm"
    assert "source system" in info.value.hint
