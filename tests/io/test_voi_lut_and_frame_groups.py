"""A VOI LUT of 8-bit entries longer than 256, per-frame functional groups fewer than the frames, and a big-endian
palette."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from medtriage.errors import DicomError
from medtriage.io.dicom import read_dicom
from tests.io.test_dicom import make_dataset


def test_voi_lut_of_8_bit_entries_for_12_bit_values_looks_up_every_value():
    """PS3.3 C.11.2.1.1 allows 8-bit output for a 12-bit input range: 4096 entries of 8 bits each."""
    ramp = np.arange(4096).reshape(64, 64)
    ds = pydicom.dcmread(io.BytesIO(make_dataset(ramp, 12)))
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 8])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", [v // 16 for v in range(4096)])  # LUT Data
    ds.VOILUTSequence = [item]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    pixels = read_dicom(buffer.getvalue()).pixels[0, 0].ravel()
    np.testing.assert_allclose(pixels, np.arange(4096) // 16 / 255.0, atol=1e-6)


def test_fewer_per_frame_groups_than_frames_with_differing_values_is_refused():
    """Frames without their own rescale cannot be mapped; they must not be dropped from the image either."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file("emri_small.dcm")  # 10 frames
    if path is None:
        pytest.skip("pydicom test file emri_small.dcm not available")
    ds = pydicom.dcmread(path)
    groups = []
    for slope in (1, 2):
        rescale = Dataset()
        rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = slope, 0, "US"
        group = Dataset()
        group.PixelValueTransformationSequence = [rescale]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    buffer = io.BytesIO()
    ds.save_as(buffer)
    for frame in (None, 5):
        with pytest.raises(DicomError, match="Per-frame Functional Groups Sequence has 2 items for 10 frames"):
            read_dicom(buffer.getvalue(), frame=frame)


@pytest.mark.parametrize("name", ["OBXXXX1A", "OBXXXX1A_2frame"])
def test_a_big_endian_palette_colour_image_shows_as_its_little_endian_twin(name):
    """16-bit palette entries were read in the machine's byte order: the big-endian copy came out near black."""
    little = read_dicom(get_testdata_file(f"{name}.dcm")).pixels
    big = read_dicom(get_testdata_file(name.replace("OBXXXX1A", "OBXXXX1A_expb") + ".dcm")).pixels
    assert little.max() > 0.9
    np.testing.assert_array_equal(big, little)
