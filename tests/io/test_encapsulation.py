"""Frames of encapsulated pixel data, located as pydicom's decoders locate them (the one rule read_dicom and ingest
share), without copying the pixel data, at a cost bounded by the frames asked for."""

from __future__ import annotations

import itertools
import struct
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, encapsulate_extended, generate_fragmented_frames, generate_fragments, generate_frames

import medtriage.io.dicom
import medtriage.io.ingest_file
from medtriage.io.encapsulation import MalformedItems, Span, ends_with, frame_bytes, frame_ends, frames_in
from tests.memory import outcome_and_peak_bytes

JPEG_2000, RLE = "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"


def _frames(name: str) -> list[bytes]:
    ds = pydicom.dcmread(get_testdata_file(name))
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def _pydicoms_last_fragments(data: bytes, claimed: int, extended) -> list[bytes]:
    """The last fragment of each frame pydicom's decoders decode; with fewer fragments than frames and no table (pydicom
    refuses to guess), one per fragment."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on frames it does not find
        try:
            found = generate_fragmented_frames(data, number_of_frames=claimed, extended_offsets=extended)
            return [frame[-1] if frame else b"" for frame in itertools.islice(found, claimed)]
        except ValueError:
            fragments = generate_fragments(data[8 + struct.unpack_from("<L", data, 4)[0] :])
            return list(itertools.islice(fragments, claimed))


def _layouts():
    """(name, pixel data, Number of Frames, extended offsets) from pydicom's 10-frame samples."""
    for sample in (JPEG_2000, RLE):
        frames = _frames(sample)
        extended = encapsulate_extended(frames)
        yield f"{sample} basic table", encapsulate(frames, has_bot=True), 10, None
        yield f"{sample} no table", encapsulate(frames, has_bot=False), 10, None
        yield f"{sample} extended table", extended[0], 10, extended[1:]
        yield f"{sample} extended table one entry short", extended[0], 10, (extended[1][:-8], extended[2][:-8])
        yield f"{sample} 3 fragments per frame, basic table", encapsulate(frames, fragments_per_frame=3, has_bot=True), 10, None
        yield f"{sample} 3 fragments per frame, no table", encapsulate(frames, fragments_per_frame=3, has_bot=False), 10, None
        yield f"{sample} one frame claimed of ten", encapsulate(frames, has_bot=False), 1, None
        yield f"{sample} a frame missing, no table", encapsulate(frames[:9], has_bot=False), 10, None
        yield f"{sample} a frame missing, basic table", encapsulate(frames[:9], has_bot=True), 10, None
        yield f"{sample} fewer frames claimed than held", encapsulate(frames, has_bot=True), 4, None


LAYOUTS = list(_layouts())


@pytest.mark.parametrize(("data", "claimed", "extended"), [case[1:] for case in LAYOUTS], ids=[case[0] for case in LAYOUTS])
def test_frames_are_found_where_pydicoms_decoders_find_them(data, claimed, extended):
    found = [data[start:stop] for start, stop in frame_ends(data, claimed, extended)]
    assert found == _pydicoms_last_fragments(data, claimed, extended)


def _pydicoms_frames(data: bytes, claimed: int, extended) -> list[bytes]:
    """The bytes of each frame pydicom's decoders decode (fewer fragments than frames, without a table: one each)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = generate_fragmented_frames(data, number_of_frames=claimed, extended_offsets=extended)
            return [b"".join(frame) for frame in itertools.islice(found, claimed)]
        except ValueError:
            return _pydicoms_last_fragments(data, claimed, extended)


@pytest.mark.parametrize(("data", "claimed", "extended"), [case[1:] for case in LAYOUTS], ids=[case[0] for case in LAYOUTS])
def test_each_frame_is_the_bytes_pydicoms_decoders_are_handed(data, claimed, extended):
    assert [bytes(frame_bytes(data, frame)) for frame in frames_in(data, claimed, extended)] == _pydicoms_frames(data, claimed, extended)


def test_a_frame_of_many_fragments_is_joined_in_one_copy_of_that_frame():
    """Ten frames of 2 MB in 64 fragments each: one frame's bytes take one frame's memory, however many fragments."""
    frames = [bytes([i]) * (2 << 20) for i in range(10)]
    data = encapsulate(frames, fragments_per_frame=64, has_bot=True)
    located = list(frames_in(data, 10))
    peak = _peak(lambda: frame_bytes(data, located[6]))
    assert bytes(frame_bytes(data, located[6])) == frames[6] and peak < (2 << 20) + (64 << 10)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xfe\xff\x00\xe0\x03\x00\x00\x00abc", "Basic Offset Table item of 3 bytes"),
        (b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\xff\xff\xff\xff", "undefined length"),
        (b"\xfe\xff\x00\xe0\x00\x00\x00\x00\x08\x00\x10\x00\x02\x00\x00\x00ab", r"tag \(0008,0010\) at byte 8"),
        (b"\xe0\x7f\x10\x00\x00\x00\x00\x00", "not the Basic Offset Table item"),
    ],
)
def test_items_that_cannot_be_walked_are_refused_with_the_reason(data, reason):
    with pytest.raises(MalformedItems, match=reason):
        list(frame_ends(data, 2))


@pytest.mark.parametrize(
    ("fragment", "ends"),
    [
        (b"\xff\x4f...\xff\xd9", True),
        (b"\xff\x4f...\xff\xd9\x00", True),  # padded to an even length
        (b"\xff\x4f...\xff\xd9" + bytes(10_000), True),  # more padding than one step back
        (b"\xff\x4f...\xff" + bytes(4095) + b"\xd9", False),
        (b"\xff\x4f..." + bytes(9_999), False),
        (b"", False),
    ],
)
def test_the_end_of_image_marker_is_looked_for_before_the_padding(fragment, ends):
    data = b"head" + fragment + b"tail"
    assert ends_with(data, Span(4, 4 + len(fragment)), b"\xff\xd9") is ends


def _big_frames_dataset(pixel_data: bytes, frames: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file(JPEG_2000))
    ds.PixelData, ds.NumberOfFrames = pixel_data, frames
    return ds


def _large_frames() -> pydicom.Dataset:
    """Ten 2 MB frames, one fragment each (codestreams in outline: nothing here decodes them)."""
    return _big_frames_dataset(encapsulate([b"\xff\x4f" + b"\x01" * (2 << 20) + b"\xff\xd9"] * 10, has_bot=False), 10)


def _a_million_table_entries() -> pydicom.Dataset:
    """Two frames after a Basic Offset Table of a million entries (4 MB)."""
    table = b"\xfe\xff\x00\xe0" + struct.pack("<LLL", 4 << 20, 0, 12) + bytes((4 << 20) - 8)  # frame 2 at byte 12
    return _big_frames_dataset(table + encapsulate([b"\xff\x4f\xff\xd9"] * 2, has_bot=False)[8:], 2)


def _peak(check) -> int:
    """The most memory `check` held; what it raised is raised here."""
    outcome, peak = outcome_and_peak_bytes(check)
    if isinstance(outcome, Exception):
        raise outcome
    return peak


@pytest.mark.parametrize("make", [_large_frames, _a_million_table_entries], ids=["large frames", "a million table entries"])
def test_counting_frames_copies_no_frame_and_reads_no_more_of_a_table_than_the_frames_need(make):
    """Before, ingest's check held a copy of every frame and read the whole table into a list (tens of MB here), and
    read_dicom's count copied each fragment in turn (2 MB each)."""
    ds = make()
    assert _peak(lambda: medtriage.io.dicom._require_claimed_frames(ds, "big.dcm")) < 256 << 10
    assert _peak(lambda: medtriage.io.ingest_file._pixel_problem(ds, verify=False)) < 256 << 10
    assert medtriage.io.ingest_file._pixel_problem(ds, verify=False) is None
