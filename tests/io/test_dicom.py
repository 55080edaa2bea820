"""DICOM decoding on pydicom's own real test files, plus small hand-built ones with known answers."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_voi
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtriage.errors import DicomError, NotAnImageError
from medtriage.io.dicom import read_dicom


def sample_file(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return path


# name, photometric, expected pixels shape [F, C, H, W]
DECODABLE = [
    ("CT_small.dcm", "MONOCHROME2", (1, 1, 128, 128)),  # signed 16-bit, rescale slope/intercept
    ("MR_small.dcm", "MONOCHROME2", (1, 1, 64, 64)),  # window center/width
    ("MR_small_RLE.dcm", "MONOCHROME2", (1, 1, 64, 64)),
    ("MR_small_jp2klossless.dcm", "MONOCHROME2", (1, 1, 64, 64)),
    ("MR_small_jpeg_ls_lossless.dcm", "MONOCHROME2", (1, 1, 64, 64)),
    ("MR_small_bigendian.dcm", "MONOCHROME2", (1, 1, 64, 64)),
    ("JPGExtended.dcm", "MONOCHROME2", (1, 1, 1024, 256)),  # JPEG extended 12-bit
    ("JPEG-lossy.dcm", "MONOCHROME2", (1, 1, 1024, 256)),
    ("RG3_J2KR.dcm", "MONOCHROME1", (1, 1, 1760, 1760)),  # CR, MONOCHROME1, JPEG 2000 lossless
    ("vlut_04.dcm", "MONOCHROME2", (1, 1, 512, 512)),  # VOI LUT Sequence
    ("mlut_18.dcm", "MONOCHROME2", (1, 1, 512, 512)),  # Modality LUT Sequence
    ("emri_small.dcm", "MONOCHROME2", (10, 1, 64, 64)),  # multi-frame
    ("emri_small_RLE.dcm", "MONOCHROME2", (10, 1, 64, 64)),
    ("SC_rgb.dcm", "RGB", (1, 3, 100, 100)),
    ("SC_rgb_16bit.dcm", "RGB", (1, 3, 100, 100)),
    ("SC_rgb_2frame.dcm", "RGB", (2, 3, 100, 100)),
    ("SC_rgb_rle.dcm", "RGB", (1, 3, 100, 100)),
    ("SC_rgb_jpeg_gdcm.dcm", "RGB", (1, 3, 100, 100)),  # JPEG lossless RGB
    ("SC_rgb_jpeg_dcmtk.dcm", "YBR_FULL", (1, 3, 100, 100)),  # JPEG baseline YBR
    ("SC_ybr_full_uncompressed.dcm", "YBR_FULL", (1, 3, 100, 100)),
    ("US1_J2KR.dcm", "YBR_RCT", (1, 3, 480, 640)),
    ("OBXXXX1A.dcm", "PALETTE COLOR", (1, 3, 600, 800)),
]


@pytest.mark.parametrize("name, photometric, shape", DECODABLE, ids=[d[0] for d in DECODABLE])
def test_decodes_real_files_to_unit_range(name, photometric, shape):
    image = read_dicom(sample_file(name))
    assert image.pixels.shape == shape
    assert image.pixels.dtype == np.float32
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert image.pixels.std() > 0.001, "decoded to a flat image"
    assert image.photometric == photometric
    assert (image.frames, image.rows, image.columns) == (shape[0], shape[2], shape[3])
    assert image.sop_uid and image.transfer_syntax


@pytest.mark.parametrize(
    "compressed, reference",
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),
        ("SC_rgb_rle_2frame.dcm", "SC_rgb_2frame.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),
    ],
)
def test_lossless_syntaxes_decode_identically(compressed, reference):
    np.testing.assert_array_equal(read_dicom(sample_file(compressed)).pixels, read_dicom(sample_file(reference)).pixels)


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(sample_file("RG3_UNCR.dcm"))
    stored = ds.pixel_array.astype(np.float64).ravel()
    decoded = read_dicom(sample_file("RG3_UNCR.dcm")).pixels.ravel().astype(np.float64)
    sample = slice(None, None, 97)
    assert np.corrcoef(stored[sample], decoded[sample])[0, 1] < -0.9


def test_voi_lut_sequence_matches_pydicom():
    ds = pydicom.dcmread(sample_file("vlut_04.dcm"))
    bits = ds.VOILUTSequence[0].LUTDescriptor[2]
    expected = apply_voi(ds.pixel_array, ds) / (2**bits - 1)
    np.testing.assert_allclose(read_dicom(sample_file("vlut_04.dcm")).pixels[0, 0], expected, atol=1e-6)


def test_color_is_rgb_order():
    rgb = read_dicom(sample_file("SC_rgb.dcm")).pixels[0]
    # SC_rgb.dcm: the top band is pure red (255, 0, 0)
    np.testing.assert_allclose(rgb[:, 2, 50], [1.0, 0.0, 0.0])
    ybr = read_dicom(sample_file("SC_ybr_full_uncompressed.dcm")).pixels[0]
    np.testing.assert_allclose(ybr, rgb, atol=8 / 255)


def test_single_frame_selection():
    all_frames = read_dicom(sample_file("emri_small.dcm")).pixels
    third = read_dicom(sample_file("emri_small.dcm"), frame=2).pixels
    np.testing.assert_array_equal(third[0], all_frames[2])


def test_bytes_and_stream_sources():
    path = sample_file("CT_small.dcm")
    data = open(path, "rb").read()
    from_path = read_dicom(path).pixels
    np.testing.assert_array_equal(read_dicom(data).pixels, from_path)
    np.testing.assert_array_equal(read_dicom(io.BytesIO(data)).pixels, from_path)


def make_dataset(stored: np.ndarray, bits_stored: int, **attrs) -> bytes:
    """A small uncompressed grayscale secondary-capture file with the given attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_rescale_then_window():
    stored = np.array([[0, 100, 200, 300]])
    data = make_dataset(stored, 12, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=201)
    # modality values -100, 100, 300, 500; LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1]
    np.testing.assert_allclose(read_dicom(data).pixels[0, 0, 0], [0.0, 0.0025, 1.0, 1.0], atol=1e-6)
    data = make_dataset(stored, 12, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=800, VOILUTFunction="LINEAR_EXACT")
    np.testing.assert_allclose(read_dicom(data).pixels[0, 0, 0], [0.125, 0.375, 0.625, 0.875])


def test_no_window_scales_by_stored_range_and_monochrome1_inverts():
    stored = np.array([[0, 1023, 4095]])
    np.testing.assert_allclose(read_dicom(make_dataset(stored, 12)).pixels[0, 0, 0], [0.0, 1023 / 4095, 1.0])
    inverted = read_dicom(make_dataset(stored, 12, PhotometricInterpretation="MONOCHROME1")).pixels
    np.testing.assert_allclose(inverted[0, 0, 0], [1.0, 1 - 1023 / 4095, 0.0], atol=1e-6)


def test_truncated_pixel_data_says_how_much_is_missing():
    data = open(sample_file("CT_small.dcm"), "rb").read()
    with pytest.raises(DicomError, match=r"truncated pixel data \(expected 32768 bytes, got \d+\)") as info:
        read_dicom(data[:-200])
    got = int(info.value.reason.split("got ")[1].rstrip(")"))
    assert 32768 - 200 <= got < 32768


def test_file_cut_before_pixels_is_a_dicom_error_not_a_non_image():
    data = open(sample_file("CT_small.dcm"), "rb").read()
    with pytest.raises(DicomError, match="truncated") as info:
        read_dicom(data[:1000])
    assert not isinstance(info.value, NotAnImageError)


def test_not_dicom(tmp_path):
    text_file = tmp_path / "notes.dcm"
    text_file.write_text("patient notes, not an image\n" * 20)
    with pytest.raises(DicomError, match="not a DICOM file") as info:
        read_dicom(text_file)
    assert str(text_file) in str(info.value)
    with pytest.raises(DicomError, match="file not found"):
        read_dicom(tmp_path / "missing.dcm")


@pytest.mark.parametrize(
    "name, sop_class",
    [
        ("rtplan.dcm", "RT Plan Storage"),
        ("test-SR.dcm", "Comprehensive SR Storage"),
        ("waveform_ecg.dcm", "12-lead ECG Waveform Storage"),
    ],
)
def test_objects_without_pixels_name_their_sop_class(name, sop_class):
    with pytest.raises(NotAnImageError, match=sop_class):
        read_dicom(sample_file(name))


def test_damaged_compressed_stream_is_a_typed_error():
    with pytest.raises(DicomError, match="cannot decode pixel data"):
        read_dicom(sample_file("JPEG2000-embedded-sequence-delimiter.dcm"))


def test_decoder_module_does_not_import_training_stack(run_without_training_stack):
    result = run_without_training_stack(
        """
        from medtriage.io.dicom import read_dicom
        from pydicom.data import get_testdata_file
        print(read_dicom(get_testdata_file('MR_small_RLE.dcm')).pixels.shape)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "(1, 1, 64, 64)" in result.stdout


def test_an_empty_center_or_a_zero_width_means_no_window():
    data = make_dataset(np.array([[0, 1, 2, 3]]), 12, WindowCenter="", WindowWidth="0")
    assert read_dicom(data).pixels.shape == (1, 1, 1, 4)  # an empty center means: no window
    data = make_dataset(np.array([[0, 1, 2, 3]]), 12, WindowCenter=100, WindowWidth=0, VOILUTFunction="LINEAR_EXACT")
    plain = make_dataset(np.array([[0, 1, 2, 3]]), 12)
    np.testing.assert_array_equal(read_dicom(data).pixels, read_dicom(plain).pixels)  # a zero width means: no window
