"""Ingest looks at a compressed file's frames three times: screening counts them (a frame past Number of Frames is
quarantined) and walks each for damage, the pixel checks look for frames missing, and de-identification cleans each
of its stream metadata. Before, each of those split the encapsulated pixel data into frames again; they now share one
split (`encapsulation.frames_split_once`), with every outcome as before."""

from __future__ import annotations

import contextlib
import struct
from collections import Counter

import pytest
from pydicom.encaps import encapsulate

import medtriage.io.ingest_file as ingest_file
from medtriage.io import encapsulation
from medtriage.io.deid import DeidOptions
from medtriage.io.ingest_file import init_worker, process_file
from tests.io.test_deid_stream_metadata import NAME, _after_soi, _com, _planted
from tests.io.test_frames_past_count import CASES, _file, _read, _ready_to_pool
from tests.io.test_unwalked_syntaxes import KEY

SPLITS = ("_by_basic_table", "_by_extended_table", "_by_fragments", "_at_end_markers")  # each splits items into frames


def _counted_splits(monkeypatch) -> Counter:
    """How many times each way of splitting the items into frames is begun."""
    begun = Counter()
    for name in SPLITS:
        real = getattr(encapsulation, name)

        def counted(*args, _real=real, _name=name):
            begun[_name] += 1
            return _real(*args)

        monkeypatch.setattr(encapsulation, name, counted)
    return begun


def _processed(tmp_path, name: str, data: bytes) -> ingest_file.Outcome:
    path = tmp_path / name
    path.write_bytes(data)
    init_worker(KEY, DeidOptions(), frozenset(), False)
    return process_file(str(path))


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{layout}" for f, layout in CASES])
def test_a_pooled_files_frames_are_split_once(tmp_path, monkeypatch, family, layout):
    data = _file(family, layout, hidden=False)
    begun = _counted_splits(monkeypatch)
    out = _processed(tmp_path, "a.dcm", data)
    assert out.status == "pending" and out.encoded, (out.reason, out.detail)
    assert begun and max(begun.values()) == 1, begun


def _with_app1(tmp_path) -> bytes:
    return _planted("examples_ybr_color.dcm", lambda frame: _after_soi(frame, _com(), b"\xff\xe1\x00\x08Exif"))


def _malformed_after_the_frames(tmp_path) -> bytes:
    """A Basic Offset Table of one entry more than Number of Frames, the item after the counted frames malformed."""
    ds = _read(_file("jpeg", "basic table", hidden=False))
    ds.PixelData += b"\x08\x00\x10\x00\x02\x00\x00\x00ab"
    return _ready_to_pool(ds, None)


def _a_frame_missing(tmp_path) -> bytes:
    ds = _read(_file("j2k", "no table", hidden=False))
    ds.NumberOfFrames = int(ds.NumberOfFrames) + 1
    return _ready_to_pool(ds, None)


def _misplaced_entry(tmp_path) -> bytes:
    ds = _read(_file("jpeg", "basic table", hidden=False))
    data = bytearray(ds.PixelData)
    struct.pack_into("<L", data, 8 + 4, struct.unpack_from("<L", data, 8 + 4)[0] + 2)  # frame 2's entry, 2 bytes on
    ds.PixelData = bytes(data)
    return _ready_to_pool(ds, None)


def _one_claimed_two_held(tmp_path) -> bytes:
    ds = _read(_file("jpeg", "no table", hidden=False))
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9", NAME + b"\xff\xd9"], has_bot=False)
    return _ready_to_pool(ds, None)


ODD = {
    "stream metadata removed": _with_app1,
    "frame past the count": lambda tmp_path: _file("rle", "no table", hidden=True),
    "frame past the count, extended table": lambda tmp_path: _file("j2k", "extended table", hidden=True),
    "frame past the count, fragments ending in markers": lambda tmp_path: _file("jpeg", "3 fragments a frame, no table", hidden=True),
    "malformed item after the counted frames": _malformed_after_the_frames,
    "a frame missing": _a_frame_missing,
    "misplaced offset table entry": _misplaced_entry,
    "one frame claimed, two held": _one_claimed_two_held,
}


@pytest.mark.parametrize("make", ODD.values(), ids=ODD.keys())
def test_outcomes_are_those_of_frames_split_for_each_look(tmp_path, monkeypatch, make):
    """Each outcome (pooled or quarantined, why, what is written) is the one of a split of its own for each look."""
    data = make(tmp_path)
    shared = _processed(tmp_path, "shared.dcm", data)
    monkeypatch.setattr(ingest_file, "frames_split_once", contextlib.nullcontext)
    alone = _processed(tmp_path, "alone.dcm", data)
    fields = ("status", "reason", "detail", "sop_uid", "pixel_sha256", "stream_metadata", "encoded")
    assert {f: getattr(shared, f) for f in fields} == {f: getattr(alone, f) for f in fields}
