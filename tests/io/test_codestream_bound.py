"""The size a JPEG / JPEG 2000 frame declares is found however far into the frame it sits, or the frame is refused:
never decoded unchecked. Frames made here: a Pillow JPEG with over 1 MiB of comment segments before its frame
header, and pydicom's JPEG 2000 sample wrapped in a JP2 file with boxes before its codestream."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000, JPEGBaseline8Bit

from medtriage.errors import DicomError
from medtriage.io.decode_limits import MAX_HEADER_SEGMENTS
from medtriage.io.dicom import read_dicom

SIDE = 16
HUGE = 40_000  # 40000 x 40000 samples: gigabytes, if a decoder were let loose on it
COMMENT = b"x" * 65_000  # nearly the largest a segment can hold
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _jpeg(comments: int, comment: bytes = COMMENT, side: tuple[int, int] | None = None) -> bytes:
    """A 16 x 16 grayscale JPEG with `comments` COM segments after SOI; its frame header says `side` if given."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(SIDE * SIDE, dtype=np.uint8).reshape(SIDE, SIDE)).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    if side is not None:
        sof = data.index(b"\xff\xc0")
        data = data[: sof + 5] + struct.pack(">HH", *side) + data[sof + 9 :]
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return data[:2] + segment * comments + data[2:]


def _dicom(path: Path, frame: bytes, syntax, rows: int = SIDE, columns: int = SIDE) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    for keyword in ("WindowCenter", "WindowWidth"):
        ds.pop(keyword, None)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_jpeg_frame_header_after_a_megabyte_of_comments_is_still_checked(tmp_path, decoder_calls):
    frame = _jpeg(comments=20, side=(HUGE, HUGE))
    assert frame.index(b"\xff\xc0") > 1 << 20
    path = _dicom(tmp_path / "tall-sof.dcm", frame, JPEGBaseline8Bit)
    with pytest.raises(DicomError, match=rf"tall-sof\.dcm: .*compressed frame declares {HUGE * HUGE} samples, the header {SIDE * SIDE}"):
        read_dicom(path)
    assert decoder_calls == []


def test_a_jpeg_whose_segments_are_honest_still_decodes_past_a_megabyte_of_comments(tmp_path):
    path = _dicom(tmp_path / "commented.dcm", _jpeg(comments=20), JPEGBaseline8Bit)
    assert read_dicom(path).pixels.shape == (1, 1, SIDE, SIDE)


def test_a_jpeg_whose_frame_header_is_not_within_the_segment_bound_is_refused(tmp_path, decoder_calls):
    frame = _jpeg(comments=MAX_HEADER_SEGMENTS, comment=b"")
    path = _dicom(tmp_path / "chatty.dcm", frame, JPEGBaseline8Bit)
    with pytest.raises(DicomError, match=rf"chatty\.dcm: .*no frame header \(SOF\) within its first {MAX_HEADER_SEGMENTS} marker segments"):
        read_dicom(path)
    assert decoder_calls == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda frame: frame[2:],  # no SOI
        lambda frame: frame[:2] + b"\x00\x00" + frame[2:],  # bytes where a marker belongs: decoders would skip them
        lambda frame: frame[: frame.index(b"\xff\xc0")],  # ends before its frame header
    ],
)
def test_a_jpeg_frame_that_cannot_be_walked_to_its_frame_header_is_refused(tmp_path, decoder_calls, damage):
    path = _dicom(tmp_path / "damaged.dcm", damage(_jpeg(comments=1)), JPEGBaseline8Bit)
    with pytest.raises(DicomError, match=r"damaged\.dcm: cannot decode pixel data: frame 1 .*JPEG"):
        read_dicom(path)
    assert decoder_calls == []


def _j2k_frame(side: tuple[int, int] | None = None) -> bytes:
    """pydicom's JPEG 2000 sample frame (a raw codestream, 1024 x 256), its SIZ saying `side` (rows, columns) if given."""
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert frame[:4] == b"\xff\x4f\xff\x51"
    if side is not None:
        rows, columns = side
        frame = frame[:8] + struct.pack(">II", columns, rows) + frame[16:]
    return frame


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


@pytest.mark.parametrize(
    "before",
    [
        _box(b"xml ", b"<x/>" * 300_000),  # the codestream starts past the first MiB
        _box(b"uuid", _j2k_frame((SIDE, SIDE))[:64]),  # a small SIZ that is not the codestream's
    ],
    ids=["big-box", "decoy-siz"],
)
def test_a_jp2_codestream_is_found_by_its_box_and_checked(tmp_path, decoder_calls, before):
    frame = JP2_SIGNATURE + _box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ") + before + _box(b"jp2c", _j2k_frame((HUGE, HUGE)))
    path = _dicom(tmp_path / "wrapped.dcm", frame, JPEG2000)
    with pytest.raises(DicomError, match=rf"wrapped\.dcm: .*compressed frame declares {HUGE * HUGE} samples"):
        read_dicom(path)
    assert decoder_calls == []


def test_a_jpeg2000_frame_without_soc_and_siz_first_is_refused(tmp_path, decoder_calls):
    frame = b"\x00" * 8 + _j2k_frame((HUGE, HUGE))  # openjpeg refuses it too: this only keeps it from reaching a decoder
    path = _dicom(tmp_path / "shifted.dcm", frame, JPEG2000)
    with pytest.raises(DicomError, match=r"shifted\.dcm: cannot decode pixel data: frame 1 .*JPEG 2000"):
        read_dicom(path)
    assert decoder_calls == []
