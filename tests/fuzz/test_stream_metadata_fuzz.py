"""Hostile compressed frames: pydicom's real JPEG, JPEG-LS and JPEG 2000 files with bytes flipped, inserted or cut,
and marker segment lengths set to 0, 1, 2 or their largest, through the walk that removes a frame's metadata. Every
outcome is a cleaned result or a typed refusal (DamagedFrame, MalformedItems, FramesUnknown), and the quarantine
screen (`damaged_frame`) refuses exactly the frames de-identification refuses.

MEDTRIAGE_FUZZ_EXAMPLES sets the examples (default 300, seeded: a few seconds); set, the run is random.
"""

from __future__ import annotations

import io
import os
import struct

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

from medtriage.io.encapsulation import MalformedItems
from medtriage.io.stream_metadata import DamagedFrame, FramesUnknown, damaged_frame, stripped_pixel_data

EXAMPLES = int(os.environ.get("MEDTRIAGE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="MEDTRIAGE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SEEDS = [
    "JPEG-lossy.dcm",
    "JPEG-LL.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG2000.dcm",
    "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "MR_small_jp2klossless.dcm",
]
TYPED = (DamagedFrame, MalformedItems, FramesUnknown)


SEED_BYTES = {name: open(get_testdata_file(name), "rb").read() for name in SEEDS}


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(SEED_BYTES[name]))


def _first_frame(name: str) -> bytes:
    ds = _read(name)
    return next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))


FRAMES = {name: _first_frame(name) for name in SEEDS}


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(SEEDS))
    frame = bytearray(FRAMES[name])
    how = draw(st.sampled_from(["flip", "insert", "cut", "length"]))
    at = draw(st.integers(0, len(frame) - 1))
    if how == "flip":
        frame[at] = draw(st.integers(0, 255))
    elif how == "insert":  # marker-like bytes most of the time: they are what the walk reads
        frame[at:at] = draw(st.binary(min_size=1, max_size=12) | st.sampled_from([b"\xff\xfe", b"\xff\x64", b"\xff\x90"]))
    elif how == "cut":
        del frame[at:]
    else:
        markers = [i for i in range(len(frame) - 4) if frame[i] == 0xFF and frame[i + 1] not in (0x00, 0xFF)][:64]
        at = markers[draw(st.integers(0, len(markers) - 1))] if markers else at
        frame[at + 2 : at + 4] = struct.pack(">H", draw(st.sampled_from([0, 1, 2, 3, 0xFFFF])))
    return name, bytes(frame)


def _outcome(call, *args):
    try:
        return call(*args)
    except TYPED as err:
        return err


@FUZZ
@given(case=mutated())
def test_a_mutated_frame_is_cleaned_or_refused_and_quarantine_agrees(case):
    name, frame = case
    ds = _with(name, _one_item(frame))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    stripped = _outcome(stripped_pixel_data, ds, syntax)
    damaged = damaged_frame(ds, syntax)
    assert (damaged is not None) == isinstance(stripped, DamagedFrame), (damaged, stripped)
    if stripped is not None and not isinstance(stripped, Exception):
        assert len(stripped.pixel_data) <= len(ds.PixelData) + 8
        assert _outcome(stripped_pixel_data, _with(name, stripped.pixel_data), syntax) is None  # nothing left to remove


def _one_item(frame: bytes) -> bytes:
    """`frame` in one item after an empty Basic Offset Table (pydicom's encapsulate refuses an empty frame)."""
    value = frame + b"\0" * (len(frame) % 2)
    return struct.pack("<HHLHHL", 0xFFFE, 0xE000, 0, 0xFFFE, 0xE000, len(value)) + value


def _with(name: str, pixel_data: bytes) -> pydicom.Dataset:
    """The seed `name` read afresh, with `pixel_data`."""
    ds = _read(name)
    ds.PixelData = pixel_data
    return ds


@FUZZ
@given(name=st.sampled_from(SEEDS), data=st.data())
def test_mutated_items_give_only_typed_refusals(name, data):
    items = bytearray(_read(name).PixelData)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(items) - 1))
        items[at] = data.draw(st.integers(0, 255))
    ds = _with(name, bytes(items[: data.draw(st.integers(0, len(items)))]))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    assert (damaged_frame(ds, syntax) is not None) == isinstance(_outcome(stripped_pixel_data, ds, syntax), DamagedFrame)


@pytest.mark.parametrize("name", SEEDS)
def test_the_seeds_clean_to_a_fixed_point(name):
    """Cleaning twice removes nothing the second time: the walk finds again every segment it kept."""
    ds = _read(name)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    stripped = stripped_pixel_data(ds, syntax)
    if stripped is not None:
        assert stripped_pixel_data(_with(name, stripped.pixel_data), syntax) is None
