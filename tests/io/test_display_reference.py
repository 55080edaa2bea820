"""Display pixels checked against an independent reference: pydicom's own decoding and its modality LUT, VOI LUT
and windowing functions, MONOCHROME1 or Presentation LUT Shape INVERSE inverted (once where both: PS3.3 C.8.11.3 pairs
INVERSE with MONOCHROME1), scaled to [0, 1] as io.display documents it (a LUT by the bits its entries use where its
LUT Descriptor states 16 for 8- or 12-bit entries, PS3.3 C.11.1.1)."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtriage.errors import DicomError, NotAnImageError
from medtriage.io.dicom import PIXEL_KEYWORDS, read_dicom

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # color3d_jpeg_baseline.dcm: 120 JPEG frames, 13 s here; the other JPEG baseline files cover its decoder path
    TEST_FILES = sorted(Path(p) for p in get_testdata_files() if Path(p).is_file() and Path(p).name != "color3d_jpeg_baseline.dcm")
_FUNCTIONAL = {
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "WindowCenter": "FrameVOILUTSequence",
    "WindowWidth": "FrameVOILUTSequence",
    "VOILUTFunction": "FrameVOILUTSequence",
}


def _frame_dataset(ds: Dataset, index: int) -> Dataset:
    """The top-level attributes with one frame's functional group values written at the top level."""
    view = Dataset()
    for element in ds:
        if element.keyword not in (*PIXEL_KEYWORDS, "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            view.add(element)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for keyword, macro in _FUNCTIONAL.items():
        sources = [*(per_frame[index].get(macro) or [] if index < len(per_frame) else []), *(shared[0].get(macro) or [] if shared else [])]
        value = next((s.get(keyword) for s in sources if s.get(keyword) is not None), None)
        if keyword not in view and value is not None:
            setattr(view, keyword, value)
    return view


def _palette_little_endian(ds: Dataset) -> Dataset:
    """apply_color_lut reads 16-bit palette data as little-endian whatever the file's byte order: a big-endian file's
    is swapped first (as its little-endian twin holds it)."""
    if ds.original_encoding[1] is not False:
        return ds
    for colour in ("Red", "Green", "Blue"):
        data = ds.get(f"{colour}PaletteColorLookupTableData")
        if data is not None and len(data) == 2 * (ds[f"{colour}PaletteColorLookupTableDescriptor"].value[0] or 2**16):
            setattr(ds, f"{colour}PaletteColorLookupTableData", np.frombuffer(data, ">u2").astype("<u2").tobytes())
    return ds


def _lut_scale_bits(item: Dataset, big_endian: bool) -> int:
    """The bits a LUT's output is scaled by: the descriptor's, or 8 or 12 where it states more and no entry needs more."""
    stated = int(item.LUTDescriptor[2])
    data = item.LUTData
    entries = np.frombuffer(data, ">u2" if big_endian else "<u2") if isinstance(data, bytes) else np.atleast_1d(np.asarray(data))
    needed = int(entries.max()).bit_length()
    for depth in (8, 12):
        if needed <= depth < stated:
            return depth
    return stated


def reference(ds: Dataset) -> np.ndarray:
    """`[F, C, H, W]` float64 display pixels from pydicom's functions alone."""
    arr = ds.pixel_array
    photometric = str(ds.PhotometricInterpretation).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, _palette_little_endian(ds))
        rgb = rgb.reshape(-1, *rgb.shape[-3:])
        return rgb.transpose(0, 3, 1, 2) / np.float32(2.0 ** (8 * rgb.dtype.itemsize) - 1)
    if int(ds.get("SamplesPerPixel") or 1) == 3:
        return arr.reshape(-1, *arr.shape[-3:]).transpose(0, 3, 1, 2) / np.float32(2.0 ** int(ds.BitsStored) - 1)
    frames, big_endian = [], ds.original_encoding[1] is False
    for index, stored in enumerate(arr.reshape(-1, *arr.shape[-2:])):
        view = _frame_dataset(ds, index)
        if stored.dtype.kind == "f":  # Float Pixel Data without a window: each frame by its own range
            values = stored.astype(np.float64)
            out = (values - values.min()) / max(values.max() - values.min(), 1e-12)
        else:
            values = apply_modality_lut(stored, view).astype(np.float64)
            if view.get("ModalityLUTSequence"):
                y_min, y_max = 0.0, 2.0 ** _lut_scale_bits(view.ModalityLUTSequence[0], big_endian) - 1
            else:
                bits, signed = int(view.BitsStored), int(view.PixelRepresentation) == 1
                y_min, y_max = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)
                slope, intercept = float(view.get("RescaleSlope", 1)), float(view.get("RescaleIntercept", 0))
                y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
            if view.get("VOILUTSequence"):
                out = apply_voi_lut(values, view, prefer_lut=True) / (2.0 ** _lut_scale_bits(view.VOILUTSequence[0], big_endian) - 1)
            elif "WindowCenter" in view and "WindowWidth" in view:
                out = (apply_windowing(values, view) - y_min) / (y_max - y_min)  # pydicom windows into [y_min, y_max]
            else:
                low, high = sorted((y_min, y_max))
                out = np.clip((values - low) / (high - low), 0.0, 1.0)
        inverse = str(view.get("PresentationLUTShape") or "").strip().upper() == "INVERSE"
        frames.append(1.0 - out if photometric == "MONOCHROME1" or inverse else out)
    return np.stack(frames)[:, None]


def _reference_or_none(path: Path) -> tuple[Dataset | None, np.ndarray | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            return None, None
        if "TransferSyntaxUID" not in ds.file_meta and ds.original_encoding == (True, True):  # no preamble nor meta
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        if not any(k in ds for k in PIXEL_KEYWORDS):
            return ds, None
        try:
            return ds, reference(ds)
        except Exception:
            return ds, None


@pytest.mark.parametrize("path", TEST_FILES, ids=[f"{p.parent.name}/{p.name}" for p in TEST_FILES])
def test_every_pydicom_test_file_matches_the_reference_or_is_a_typed_error(path):
    ds, expected = _reference_or_none(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = read_dicom(path).pixels
    except DicomError:
        assert expected is None, "a file the reference decodes was refused"
        return
    assert pixels.dtype == np.float32 and 0.0 <= pixels.min() and pixels.max() <= 1.0
    if expected is None:  # a frame pydicom's plugins refuse and the second decoder reads (12-bit JPEG Extended)
        assert ds is not None and str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.51"
        return
    assert pixels.shape == expected.shape
    worst = np.array([np.abs(got - want).max() for got, want in zip(pixels, expected)])
    assert worst.max() < 1e-4, f"frames differ from the reference: {np.flatnonzero(worst >= 1e-4).tolist()}"


def _load(name: str, **attributes) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _assert_matches(ds: Dataset, frame: int | None = None) -> None:
    data = _bytes(ds)
    expected = reference(pydicom.dcmread(io.BytesIO(data)))
    expected = expected if frame is None else expected[frame : frame + 1]
    np.testing.assert_allclose(read_dicom(data, frame=frame).pixels, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm"])
@pytest.mark.parametrize(
    "attributes",
    [
        {"WindowCenter": 600, "WindowWidth": 1600, "VOILUTFunction": "SIGMOID"},
        {"WindowCenter": 600, "WindowWidth": 1600, "VOILUTFunction": "LINEAR_EXACT"},
        {"WindowCenter": [600, 100], "WindowWidth": [1600, 50]},  # the first of several windows
        {"WindowCenter": 600, "WindowWidth": 1},
        {"RescaleSlope": -2, "RescaleIntercept": 100, "WindowCenter": 100, "WindowWidth": 3000},
        {"RescaleSlope": 0.5, "RescaleIntercept": -300, "VOILUTFunction": "SIGMOID", "PhotometricInterpretation": "MONOCHROME1"},
    ],
    ids=["sigmoid", "linear-exact", "two-windows", "width-1", "negative-slope", "rescaled-sigmoid-monochrome1"],
)
def test_window_functions_and_rescale_match_the_reference(name, attributes):
    _assert_matches(_load(name, **attributes))


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_big_endian.dcm", "MR_small.dcm"])
def test_junk_above_bits_stored_matches_the_reference(name):
    ds = _load(name, BitsStored=12, HighBit=11)
    values = np.clip(ds.pixel_array.astype(np.int64), -2048, 2047) & 0xFFF | 0xA000
    dtype = np.dtype(">u2" if ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian else "<u2")
    ds.PixelData = values.astype(dtype).tobytes()
    _assert_matches(ds)


def _enhanced(per_frame: list[dict]) -> Dataset:
    ds = _load("eCT_Supplemental.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    del shared["FrameVOILUTSequence"]
    for item, values in zip(ds.PerFrameFunctionalGroupsSequence, per_frame):
        macro = Dataset()
        for keyword, value in values.items():
            setattr(macro, keyword, value)
        item.FrameVOILUTSequence = Sequence([macro])
    return ds


@pytest.mark.parametrize("frame", [None, 0, 1])
def test_per_frame_windows_match_the_reference(frame):
    ds = _enhanced([{"WindowCenter": 40, "WindowWidth": 400}, {"WindowCenter": 300, "WindowWidth": 2000, "VOILUTFunction": "SIGMOID"}])
    _assert_matches(ds, frame)


@pytest.mark.parametrize("name", ["emri_small_jpeg_2k_lossless.dcm", "OBXXXX1A_2frame.dcm", "rtdose.dcm"])
def test_one_frame_is_that_frame_of_the_whole(name):
    ds = _load(name)
    last = int(ds.NumberOfFrames) - 1
    _assert_matches(ds, last)


def _float_image(frames: np.ndarray, **attributes) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = len(frames), 1, "MONOCHROME2", 32
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.FloatPixelData = frames.astype(np.float32).tobytes()
    return _bytes(ds)


def test_float_pixel_data_with_a_window_is_windowed():
    frames = np.linspace(-100.0, 100.0, 32, dtype=np.float32).reshape(2, 4, 4)
    pixels = read_dicom(_float_image(frames, WindowCenter=0.0, WindowWidth=50.0, VOILUTFunction="LINEAR_EXACT")).pixels
    np.testing.assert_allclose(pixels[:, 0], np.clip(frames / 50.0 + 0.5, 0.0, 1.0), atol=1e-6)


def test_float_pixel_data_frame_alone_is_that_frame_of_the_whole():
    frames = np.stack([np.linspace(0.0, 1.0, 16), np.linspace(10.0, 20.0, 16)]).reshape(2, 4, 4)
    data = _float_image(frames)
    whole = read_dicom(data).pixels
    for index in range(2):
        np.testing.assert_array_equal(read_dicom(data, frame=index).pixels[0], whole[index])
    np.testing.assert_allclose(whole[1, 0], (frames[1] - 10.0) / 10.0, atol=1e-6)


def test_a_jpeg_frame_claiming_more_than_its_header_after_a_long_segment_is_refused():
    ds = _load("SC_rgb_jpeg_dcmtk.dcm")
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    start = frame.find(b"\xff\xc0")  # SOF0: length, precision, then rows and columns
    frame = frame[: start + 5] + struct.pack(">HH", 3000, 3000) + frame[start + 9 :]
    comment = b"\xff\xfe" + struct.pack(">H", 8000) + bytes(7998)  # a COM segment pushes SOF past the first 4 KiB
    ds.PixelData = pydicom.encaps.encapsulate([frame[:2] + comment + frame[2:]])
    with pytest.raises(DicomError, match="compressed frame declares 27000000 samples, the header 30000"):
        read_dicom(_bytes(ds))


def test_a_dicomdir_is_not_an_image_rather_than_a_truncated_file():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file("DICOMDIR")
    with pytest.raises(NotAnImageError, match="Media Storage Directory Storage"):
        read_dicom(path)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("width", [-400, 0])
def test_a_window_width_that_is_not_positive_is_no_window(function, width):
    plain = _load("CT_small.dcm")
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        plain.pop(keyword, None)
    odd = _load("CT_small.dcm", WindowCenter=40, WindowWidth=width, VOILUTFunction=function)
    np.testing.assert_array_equal(read_dicom(_bytes(odd)).pixels, read_dicom(_bytes(plain)).pixels)  # not inverted


def _lut(bits: int, entries: list[int], **attributes) -> Sequence:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(entries), 0, bits])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", entries)  # LUT Data
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return Sequence([item])


@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float input array")  # the reference's modality values
@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm"])
@pytest.mark.parametrize(
    "attributes",
    [
        {"VOILUTSequence": _lut(16, list(range(4096)))},  # 12-bit entries stated as 16 bits (PS3.3 C.11.1.1)
        {"VOILUTSequence": _lut(16, [v // 16 for v in range(4096)])},  # 8-bit entries stated as 16 bits
        {"ModalityLUTSequence": _lut(16, list(range(4096)), ModalityLUTType="US")},
        {"PresentationLUTShape": "INVERSE"},  # PS3.3 C.11.6.1
        {"PresentationLUTShape": "INVERSE", "PhotometricInterpretation": "MONOCHROME1"},  # one inversion: PS3.3 C.8.11.3
        {"PresentationLUTShape": "INVERSE", "VOILUTSequence": _lut(12, list(range(4096)))},
    ],
    ids=["voi-16-for-12", "voi-16-for-8", "modality-16-for-12", "inverse", "inverse-monochrome1", "inverse-voi-lut"],
)
def test_overstated_lut_depths_and_presentation_shape_match_the_reference(name, attributes):
    ds = _load(name, **attributes)
    if "ModalityLUTSequence" in attributes:
        for keyword in ("WindowCenter", "WindowWidth"):  # shown by the Modality LUT's own range
            ds.pop(keyword, None)
    _assert_matches(ds)
