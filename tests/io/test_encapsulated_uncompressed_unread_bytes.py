"""Encapsulated Uncompressed Explicit VR Little Endian (PS3.5 A.4.11) holds each frame's native samples in a fragment,
padded to even length. Bytes past them (or a frame too short for its samples) are read by no decoder, so text there
reached the pool unseen unless ingest ran with --verify-pixels: such a frame is quarantined as damaged_compressed_frame,
and the files a writer makes (one frame a fragment, 8, 16 and 1-bit, odd sizes padded, multi-frame) are pooled."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import generate_uid

from medtriage.io.quarantine import screen
from medtriage.io.stream_metadata import damaged_frame
from tests.io.test_deid_stream_metadata import NAME, _frames
from tests.io.test_unwalked_syntaxes import _ingested

SYNTAX = "1.2.840.10008.1.2.1.98"


def _native_frames(ds: pydicom.Dataset) -> list[bytes]:
    """Each frame's native samples: 1-bit frames packed one by one (each starts on a byte), else sliced as stored."""
    count = int(ds.get("NumberOfFrames") or 1)
    if ds.BitsAllocated == 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array.reshape(count, -1)
        return [pack_bits(frame, pad=False) for frame in pixels]
    samples = 2 if ds.PhotometricInterpretation == "YBR_FULL_422" else ds.SamplesPerPixel
    size = ds.Rows * ds.Columns * samples * ds.BitsAllocated // 8
    return [ds.PixelData[index * size : (index + 1) * size] for index in range(count)]


def _one_bit(rows: int, columns: int, count: int) -> pydicom.Dataset:
    """CT_small turned into a 1-bit multi-frame image of odd size (each frame ends inside a byte)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = (np.arange(count * rows * columns) % 3 == 0).astype(np.uint8).reshape(count, rows, columns)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, count
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(pixels.ravel())
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _encapsulated(ds: pydicom.Dataset, plant=None, frame: int = 0) -> bytes:
    """`ds`'s frames encapsulated one a fragment under Encapsulated Uncompressed, frame `frame` replaced by
    `plant(frame)`, ready to pool otherwise (a Patient ID, no burned-in text)."""
    frames = _native_frames(ds)
    if plant is not None:
        frames[frame] = plant(frames[frame])
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = SYNTAX
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.BurnedInAnnotation = "patient-1", "NO"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def _file(name: str, plant=None, frame: int = 0) -> bytes:
    ds = _one_bit(5, 7, 3) if name == "one-bit-5x7x3" else pydicom.dcmread(get_testdata_file(name))
    return _encapsulated(ds, plant, frame)


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


WRITTEN = [  # (file, bytes of a frame's samples)
    ("CT_small.dcm", 32768),  # 16-bit
    ("SC_rgb_2frame.dcm", 30000),  # 8-bit colour, two frames
    ("SC_rgb_small_odd.dcm", 27),  # an odd size: one pad byte
    ("SC_ybr_full_422_uncompressed.dcm", 20000),  # two samples a pixel
    ("one-bit-5x7x3", 5),  # 35 bits a frame: each frame packed on its own, to a byte, then padded
]


@pytest.mark.parametrize(("name", "size"), WRITTEN, ids=[name for name, _ in WRITTEN])
def test_the_files_a_writer_makes_hold_no_unread_bytes(name, size):
    ds = _read(_file(name))
    assert {len(frame) for frame in _frames(ds)} == {size + size % 2}
    assert damaged_frame(ds, SYNTAX) is None
    assert screen(ds) is None


def _past_the_samples(frame: bytes) -> bytes:
    return frame + NAME + b"\0" * (len(NAME) % 2)


PLANTED = [  # (file, frame, plant, what the reason says)
    ("CT_small.dcm", 0, _past_the_samples, "past the 32768 bytes of its samples"),
    ("SC_rgb_2frame.dcm", 1, _past_the_samples, "frame 2: "),
    ("SC_rgb_small_odd.dcm", 0, lambda frame: frame + b"\0" + NAME, "past the 27 bytes of its samples"),
    ("SC_ybr_full_422_uncompressed.dcm", 0, _past_the_samples, "past the 20000 bytes of its samples"),
    ("one-bit-5x7x3", 2, _past_the_samples, "frame 3: "),
    ("CT_small.dcm", 0, lambda frame: NAME + frame[: -len(NAME) - 2], "fewer than the 32768 bytes of its samples"),
]


@pytest.mark.parametrize(("name", "frame", "plant", "said"), PLANTED, ids=["16-bit", "2nd-frame", "odd", "ybr422", "1-bit", "short"])
def test_a_name_hidden_where_no_decoder_reads_is_quarantined(name, frame, plant, said):
    ds = _read(_file(name, plant, frame))
    assert NAME in ds.PixelData
    unsafe = screen(ds)
    assert unsafe is not None and unsafe.reason == "damaged_compressed_frame", unsafe
    assert said in unsafe.detail and f"frame {frame + 1}" in unsafe.detail, unsafe.detail


def test_a_frame_whose_size_cannot_be_known_is_quarantined():
    ds = _read(_file("CT_small.dcm"))
    del ds.BitsAllocated
    assert "Bits Allocated" in damaged_frame(ds, SYNTAX)


def _decodes(syntax: str) -> bool:
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:
        return False


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify"])
def test_ingest_pools_a_file_as_written_and_quarantines_one_with_hidden_bytes(tmp_path, verify):
    files = {
        "as-written.dcm": _file("SC_rgb_2frame.dcm"),
        "hidden.dcm": _file("SC_rgb_2frame.dcm", _past_the_samples, frame=1),
    }
    summary, rows, pooled = _ingested(tmp_path, files, verify)
    reasons = {name: row["reason"] for name, row in rows.items()}
    # --verify-pixels decodes: where pydicom has no decoder for the syntax (3.0), the file is refused as undecodable
    written = {} if not verify or _decodes(SYNTAX) else {"as-written.dcm": "undecodable_pixels"}
    assert reasons == {**written, "hidden.dcm": "damaged_compressed_frame"}, summary.line()
    assert "frame 2" in rows["hidden.dcm"]["detail"]
    assert len(pooled) == 1 - len(written)
    for path in pooled:
        assert NAME not in path.read_bytes()
        assert _frames(pydicom.dcmread(path)) == _frames(_read(files["as-written.dcm"]))
