"""RLE frames hold samples only, but a frame can still carry bytes no decoder reads: in its header's unused segment
offsets, between the header and the first segment, or past a segment's samples. Text there would reach the pool
unseen, so such a frame is quarantined as damaged_compressed_frame; the RLE files writers make are pooled as before."""

from __future__ import annotations

import struct
import subprocess

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from medtriage.io.quarantine import screen
from medtriage.io.stream_metadata import damaged_frame
from tests.io.test_deid_stream_metadata import NAME, _frames, _planted, _read
from tests.io.test_unwalked_syntaxes import _ingested

RLE_FILES = [
    "MR_small_RLE.dcm",  # 16-bit: two segments a frame
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "rtdose_rle.dcm",  # 15 frames
]


def _header(frame: bytes) -> tuple[int, list[int]]:
    count, *offsets = struct.unpack_from("<16L", frame)
    return count, offsets


def _with_header(frame: bytes, count: int, offsets: list[int]) -> bytes:
    return struct.pack("<16L", count, *offsets) + frame[64:]


def _in_unused_offsets(frame: bytes) -> bytes:
    count, _ = _header(frame)
    return frame[: 4 + 4 * count] + NAME.ljust(60 - 4 * count, b"\0")[: 60 - 4 * count] + frame[64:]


def _before_first_segment(frame: bytes) -> bytes:
    count, offsets = _header(frame)
    gap = NAME + b"\0" * (len(NAME) % 2)
    shifted = [o + len(gap) if o else 0 for o in offsets]
    return _with_header(frame, count, shifted)[:64] + gap + frame[64:]


def _past_the_last_segment(frame: bytes) -> bytes:
    return frame + NAME + b"\0" * (len(NAME) % 2)


def _past_the_first_segment(frame: bytes) -> bytes:
    count, offsets = _header(frame)
    assert count > 1
    gap = NAME + b"\0" * (len(NAME) % 2)
    cut = offsets[1]
    moved = [offsets[0], *(o + len(gap) for o in offsets[1:count]), *offsets[count:]]
    return _with_header(frame, count, moved)[:cut] + gap + frame[cut:]


@pytest.mark.parametrize("name", RLE_FILES)
def test_the_rle_files_writers_make_hold_no_unread_bytes(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert damaged_frame(ds, RLELossless) is None


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm"])
def test_rle_files_dcmtk_makes_hold_no_unread_bytes(tmp_path, need_tool, name):
    rle = tmp_path / "rle.dcm"
    made = subprocess.run([need_tool("dcmcrle", "apt-get install dcmtk"), get_testdata_file(name), str(rle)], capture_output=True)
    assert made.returncode == 0, made.stderr
    ds = pydicom.dcmread(rle)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert damaged_frame(ds, RLELossless) is None


@pytest.mark.parametrize(
    ("plant", "said"),
    [
        (_in_unused_offsets, "offsets to segments it does not have"),
        (_before_first_segment, "between its RLE header and its first segment"),
        (_past_the_last_segment, "bytes past its"),
        (_past_the_first_segment, "RLE segment 1 holds"),
    ],
    ids=["unused-offsets", "before-first-segment", "past-last-segment", "past-first-segment"],
)
def test_a_name_hidden_where_no_decoder_reads_is_quarantined(plant, said):
    data = _planted("MR_small_RLE.dcm", plant)
    ds = _read(data)
    assert NAME in ds.PixelData and ds.pixel_array.shape == (64, 64)  # a decoder reads it as if nothing were there
    unsafe = screen(ds)
    assert unsafe is not None and unsafe.reason == "damaged_compressed_frame", unsafe
    assert said in unsafe.detail and "frame 1" in unsafe.detail, unsafe.detail


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify"])
def test_ingest_pools_an_rle_file_as_written_and_quarantines_one_with_hidden_bytes(tmp_path, verify):
    files = {
        "as-written.dcm": _planted("SC_rgb_rle_2frame.dcm", lambda frame: frame, frame=1),
        "hidden.dcm": _planted("SC_rgb_rle_2frame.dcm", _past_the_last_segment, frame=1),
    }
    summary, rows, pooled = _ingested(tmp_path, files, verify)
    assert {name: row["reason"] for name, row in rows.items()} == {"hidden.dcm": "damaged_compressed_frame"}
    assert len(pooled) == 1 and NAME not in pooled[0].read_bytes(), summary.line()
    assert "frame 2" in rows["hidden.dcm"]["detail"]
    assert len(_frames(pydicom.dcmread(pooled[0]))) == 2
