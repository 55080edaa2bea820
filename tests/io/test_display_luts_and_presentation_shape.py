"""Display of lookup tables whose LUT Descriptor overstates the bits of their entries, and of Presentation LUT Shape
INVERSE, alone and with MONOCHROME1."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from medtriage.io.dicom import read_dicom
from tests.io.test_dicom import make_dataset

RAMP = np.arange(4096).reshape(64, 64)  # every 12-bit stored value once


def _lut_item(bits: int, entries: list[int]) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(entries), 0, bits])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", entries)  # LUT Data
    return item


def _with_lut(sequence: str, bits: int, entries: list[int], **attributes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dataset(RAMP, 12, **attributes)))
    item = _lut_item(bits, entries)
    if sequence == "ModalityLUTSequence":
        item.ModalityLUTType = "US"  # unspecified units
    setattr(ds, sequence, [item])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return read_dicom(data).pixels[0, 0].ravel()


@pytest.mark.parametrize("sequence", ["VOILUTSequence", "ModalityLUTSequence"])
@pytest.mark.parametrize(
    "entries, used_bits",
    [(list(range(4096)), 12), ([v // 16 for v in range(4096)], 8)],
    ids=["12-bit-entries", "8-bit-entries"],
)
def test_a_lut_stating_16_bits_for_narrower_entries_is_scaled_by_the_bits_they_use(sequence, entries, used_bits):
    """PS3.3 C.11.1.1: some writers state 16 bits per entry for 8- or 12-bit entries. Scaled by 2^16 - 1 the image
    came out near black (at most 4095 / 65535 = 0.06)."""
    overstated = _pixels(_with_lut(sequence, 16, entries))
    np.testing.assert_allclose(overstated, np.array(entries) / (2.0**used_bits - 1), atol=1e-6)
    if sequence == "VOILUTSequence" or used_bits == 8:  # a Modality LUT states 8 or 16 (PS3.3 C.11.1.1)
        np.testing.assert_array_equal(overstated, _pixels(_with_lut(sequence, used_bits, entries)))


@pytest.mark.parametrize("sequence", ["VOILUTSequence", "ModalityLUTSequence"])
@pytest.mark.parametrize("largest", [40000, 65535])
def test_a_16_bit_lut_whose_entries_need_more_than_12_bits_keeps_its_stated_depth(sequence, largest):
    entries = [v * largest // 4095 for v in range(4096)]
    np.testing.assert_allclose(_pixels(_with_lut(sequence, 16, entries)), np.array(entries) / 65535.0, atol=1e-6)


def _image(photometric: str, shape: str | None, with_voi_lut: bool) -> bytes:
    """The ramp without a VOI (the affine path) or through a VOI LUT (the lookup path)."""
    attributes = {"PhotometricInterpretation": photometric}
    if shape is not None:
        attributes["PresentationLUTShape"] = shape
    if with_voi_lut:
        return _with_lut("VOILUTSequence", 12, list(range(4096)), **attributes)
    return make_dataset(RAMP, 12, **attributes)


@pytest.mark.parametrize("with_voi_lut", [False, True], ids=["no-voi", "voi-lut"])
def test_presentation_lut_shape_inverse_inverts_after_voi(with_voi_lut):
    """PS3.3 C.11.6.1: INVERSE maps the VOI output v to max - v. It was ignored."""
    plain = _pixels(_image("MONOCHROME2", None, with_voi_lut))
    np.testing.assert_allclose(plain, RAMP.ravel() / 4095.0, atol=1e-6)
    np.testing.assert_allclose(_pixels(_image("MONOCHROME2", "INVERSE", with_voi_lut)), 1.0 - plain, atol=1e-6)
    np.testing.assert_array_equal(_pixels(_image("MONOCHROME2", "IDENTITY", with_voi_lut)), plain)


@pytest.mark.parametrize("with_voi_lut", [False, True], ids=["no-voi", "voi-lut"])
def test_monochrome1_with_presentation_lut_shape_inverse_is_inverted_once(with_voi_lut):
    """PS3.3 C.8.11.3 (DX Image) requires INVERSE with MONOCHROME1: the shape states the inversion MONOCHROME1
    implies, so the two together show as MONOCHROME1 alone does (its smallest value white), not inverted back."""
    plain = _pixels(_image("MONOCHROME2", None, with_voi_lut))
    for shape in (None, "INVERSE", "IDENTITY"):
        np.testing.assert_allclose(_pixels(_image("MONOCHROME1", shape, with_voi_lut)), 1.0 - plain, atol=1e-6)
