"""The blocked affine display map gives what the step-by-step grayscale pipeline gives, on real files and on
hand-built ones whose unused high bits hold junk."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medtriage.io import native_pixels
from medtriage.io.dicom import read_dicom
from medtriage.io.display import _general_to_display
from tests.io.test_dicom import make_dataset, sample_file

# uncompressed grayscale files: signed CT with rescale, MR with a window, multi-frame MR, MONOCHROME1 CR (15 of 16 bits)
REAL = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "RG3_UNCR.dcm", "RG1_UNCI.dcm"]


def stepwise(data) -> np.ndarray:
    """The general path: pydicom's decoder, then each step of the grayscale pipeline in turn."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data) if isinstance(data, bytes) else data)
    stored = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    return _general_to_display(stored, ds, "test")


@pytest.mark.parametrize("name", REAL)
def test_blocked_map_matches_the_stepwise_pipeline_on_real_files(name, monkeypatch):
    path = sample_file(name)
    monkeypatch.setattr(native_pixels, "BLOCK_PIXELS", 1000)  # several blocks, one ending mid-row, even on small files
    image = read_dicom(path)
    assert image.frame_means is not None  # the fast path was taken
    np.testing.assert_allclose(image.pixels, stepwise(path), atol=2e-6)
    np.testing.assert_allclose(image.frame_means, image.pixels.reshape(len(image.pixels), -1).mean(axis=1), atol=1e-6)


def test_junk_above_the_stored_bits_is_ignored():
    stored = np.array([[0, 100, 2048, 4095]])
    junk = stored | (0b1010 << 12)  # 12 bits stored in 16: the top 4 may hold overlay bits
    for attrs in ({}, {"WindowCenter": 2048, "WindowWidth": 1000}, {"PhotometricInterpretation": "MONOCHROME1"}):
        clean, dirty = read_dicom(make_dataset(stored, 12, **attrs)), read_dicom(make_dataset(junk, 12, **attrs))
        np.testing.assert_array_equal(dirty.pixels, clean.pixels)
        np.testing.assert_allclose(clean.pixels, stepwise(make_dataset(stored, 12, **attrs)), atol=1e-6)


def test_signed_values_are_sign_extended_from_their_stored_bits():
    stored = native_pixels.StoredValues(np.array([[[0x0FFF, 0x0800, 0x07FF, 0xF001]]], dtype="<u2").view("<i2"), 12)
    np.testing.assert_array_equal(stored.corrected(), [[[-1, -2048, 2047, 1]]])
    pixels, means = native_pixels.affine_to_unit(stored, 1 / 4095, 2048 / 4095)
    np.testing.assert_allclose(pixels[0, 0, 0], [2047 / 4095, 0.0, 1.0, 2049 / 4095], atol=1e-6)
    assert means[0] == pytest.approx(pixels.mean(), abs=1e-6)


def test_lookup_tables_and_sigmoid_take_the_general_path():
    assert read_dicom(sample_file("vlut_04.dcm")).frame_means is None  # VOI LUT Sequence
    assert read_dicom(sample_file("mlut_18.dcm")).frame_means is None  # Modality LUT Sequence
    sigmoid = read_dicom(make_dataset(np.array([[0, 2048, 4095]]), 12, WindowCenter=2048, WindowWidth=100, VOILUTFunction="SIGMOID"))
    assert sigmoid.frame_means is None and sigmoid.pixels[0, 0, 0, 1] == pytest.approx(0.5)
