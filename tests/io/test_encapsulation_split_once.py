"""Within `frames_split_once`, the frames of a pixel data value are split from its items once and every later look
takes them from that split: each look gets what a split of its own would give (the frames, how far it walks, what it
raises and where), in whatever order the looks come."""

from __future__ import annotations

import itertools

import pydicom
import pytest
from pydicom.encaps import encapsulate

from medtriage.io import encapsulation
from medtriage.io.encapsulation import (
    MalformedItems,
    claimed_frames,
    every_frame,
    frames_in,
    frames_split_once,
    misplaced_basic_entry,
    shared,
)
from tests.io.test_encapsulation import LAYOUTS

MALFORMED = b"\x08\x00\x10\x00\x02\x00\x00\x00ab"  # an item tagged (0008,0010)


def _dataset(data: bytes, claimed: int, extended) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PixelData, ds.NumberOfFrames = data, claimed
    if extended:
        ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = extended
    return ds


def _looks(ds: pydicom.Dataset, claimed: int, extended) -> list:
    """What each reader of the frames makes of them, each with what it raised, in the order ingest looks."""

    def taken(look):
        try:
            return look()
        except MalformedItems as err:
            return f"MalformedItems: {err}"

    return [
        taken(lambda: list(itertools.islice(claimed_frames(ds, claimed), 2))),  # a reader that stops early
        taken(lambda: every_frame(ds, claimed, fragment_a_frame=True)),
        taken(lambda: every_frame(ds, claimed)),
        taken(lambda: list(claimed_frames(ds, claimed))),
        taken(lambda: list(frames_in(ds.PixelData, claimed + 1, extended))),
        taken(lambda: misplaced_basic_entry(ds, claimed)),
        taken(lambda: list(frames_in(ds.PixelData, 1, extended))),
    ]


@pytest.mark.parametrize(("data", "claimed", "extended"), [case[1:] for case in LAYOUTS], ids=[case[0] for case in LAYOUTS])
def test_every_look_at_a_shared_split_is_a_split_of_its_own(data, claimed, extended):
    for pixel_data in (data, data + MALFORMED):  # items that cannot be walked after some frames, too
        ds = _dataset(pixel_data, claimed, extended)
        alone = _looks(ds, claimed, extended)
        with frames_split_once():
            assert _looks(ds, claimed, extended) == alone
            assert _looks(ds, claimed, extended) == alone  # the second time, from what the first found


def test_a_reader_of_the_first_frames_walks_no_further_than_its_own_split_would():
    """Four frames behind a table, the fourth's item malformed: the first two frames are read (the walk stops at the
    third's item), and only a reader asking for the third, which ends where the fourth begins, meets the malformed
    item, after the same two frames, as it would alone."""
    frames = [b"\xff\xd8" + bytes([index]) + b"\xff\xd9\x00" for index in range(4)]
    data = encapsulate(frames, has_bot=True)
    data = data[: data.index(frames[3]) - 8] + MALFORMED
    assert len(list(frames_in(data, 2))) == 2  # alone
    with frames_split_once():
        assert len(list(frames_in(data, 2))) == 2
        third = frames_in(data, 3)
        assert len([next(third), next(third)]) == 2
        with pytest.raises(MalformedItems, match=r"tag \(0008,0010\)"):
            next(third)
        assert len(list(frames_in(data, 2))) == 2  # after the error, what came before it still stands


def test_a_split_is_shared_by_identity_within_the_block_only():
    data = encapsulate([b"\xff\xd8\x01\xff\xd9", b"\xff\xd8\x02\xff\xd9"], has_bot=True)
    calls = []

    def count() -> int:
        calls.append(1)
        return len(calls)

    assert shared(data, ("k",), count) == 1 and shared(data, ("k",), count) == 2  # outside a block: each time
    with frames_split_once():
        assert shared(data, ("k",), count) == 3 and shared(data, ("k",), count) == 3
        assert shared(data, ("other",), count) == 4
        assert shared(bytes(bytearray(data)), ("k",), count) == 5  # equal bytes, another value: its own split
        assert shared(bytearray(data), ("k",), count) == 6 and shared(bytearray(data), ("k",), count) == 7  # mutable
    assert encapsulation._SHARED.get() is None
    with frames_split_once():
        assert shared(data, ("k",), count) == 8  # a new block splits afresh


def test_what_a_shared_computation_raised_is_raised_again():
    data, calls = b"\xfe\xff\x00\xe0\x00\x00\x00\x00", []

    def failing():
        calls.append(1)
        raise MalformedItems("bad")

    with frames_split_once():
        for _ in range(2):
            with pytest.raises(MalformedItems, match="bad"):
                shared(data, ("k",), failing)
    assert len(calls) == 1
