"""The boxes a JP2 file keeps around its codestream, where text could still hide: a colour box's ICC profile (its
description, copyright, device and private tags are free text), bytes after an enumerated colour, a File Type box's
brand, version and compatibility list, the Reader Requirements box (masks and vendor UUIDs, any bytes its lengths
cover), and a second signature box. Before, each stayed whole and the name reached the pool. Now the colour is an
enumerated one, the File Type box holds only the family's brands, Reader Requirements and stray signatures go, and the
image decodes the same (pydicom's openjpeg plugin, imagecodecs)."""

from __future__ import annotations

import io
import struct
import warnings
from collections import Counter
from collections.abc import Callable

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.io import stream_metadata
from tests.io.test_deid_stream_metadata import (
    NAME,
    _box,
    _boxes,
    _deidentified,
    _frames,
    _jp2_header,
    _offset_table_locates_every_frame,
    _pixels,
    _planted,
    _read,
)
from tests.io.test_unwalked_syntaxes import _ingested

GDCM = "GDCMJ2K_TextGBR.dcm"  # a JP2 file (Apple's ICC profile, rreq, UUID boxes) in 3-component JPEG 2000
COPYRIGHT = b"Copyright 2007 Apple Inc., all rights reserved."  # the profile's cprt tag
SRGB, GREYSCALE = _box(b"colr", b"\x01\x00\x00" + struct.pack(">L", 16)), _box(b"colr", b"\x01\x00\x00" + struct.pack(">L", 17))
SIGNATURE = b"\0\0\0\x0cjP  \r\n\x87\n"
ENUMERATED_SRGB = SRGB[8:]
CDEF = b"\x00\x03" + b"".join(struct.pack(">HHH", channel, 0, channel + 1) for channel in range(3))  # colour, in order


def _in_resc(res: bytes, extra: bytes) -> bytes:
    """The content of GDCM's Resolution box, its capture resolution running on with `extra`."""
    (kind, resc), *rest = _boxes(res, 8, len(res))
    assert kind == b"resc" and not rest
    return _box(b"resc", resc[8:] + extra)


def _top(jp2: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole box) of each top-level box, the fragment's padding after the last left out."""
    found, at = [], 0
    while at + 8 <= len(jp2):
        length, kind = struct.unpack_from(">L4s", jp2, at)
        length = length or len(jp2) - at
        found.append((kind, jp2[at : at + length]))
        at += length
    return found


def _replaced(kind: bytes, new) -> Callable[[bytes], bytes]:
    """A plant replacing each top-level box of type `kind` by `new(box)`."""
    return lambda jp2: b"".join(new(box) if k == kind else box for k, box in _top(jp2))


def _in_header(new) -> Callable[[bytes], bytes]:
    """A plant replacing the JP2 Header's children by `new(children)` (a list of (type, box))."""

    def plant(jp2: bytes) -> bytes:
        at, header, stop = _jp2_header(jp2)
        return jp2[:at] + _box(b"jp2h", b"".join(new(_boxes(jp2, at + header, stop)))) + jp2[stop:]

    return plant


def _icc_named(jp2: bytes) -> bytes:
    assert jp2.count(COPYRIGHT) == 1
    return jp2.replace(COPYRIGHT, NAME.ljust(len(COPYRIGHT)))  # same length: the profile's offsets still hold


def _header_children(jp2: bytes) -> list[tuple[bytes, bytes]]:
    at, header, stop = _jp2_header(jp2)
    return _boxes(jp2, at + header, stop)


def _ftyp(content: bytes) -> Callable[[bytes], bytes]:
    return _replaced(b"ftyp", lambda _: _box(b"ftyp", content))


def _child_named(kind: bytes, content: bytes = b"") -> Callable[[bytes], bytes]:
    """A plant running the header's `kind` child on past its fields with the name; where it has none, one holding
    `content` goes after the image header."""

    def children(kids: list[tuple[bytes, bytes]]) -> list[bytes]:
        boxes = [_box(k, box[8:] + NAME) if k == kind else box for k, box in kids]
        return boxes if kind in dict(kids) else [boxes[0], _box(kind, content + NAME), *boxes[1:]]

    return _in_header(children)


PLANTS = {
    "icc-profile": _icc_named,
    "after-enumerated-colour": _in_header(lambda kids: [_box(k, ENUMERATED_SRGB + NAME) if k == b"colr" else b for k, b in kids]),
    "after-image-header": _child_named(b"ihdr"),
    "after-bit-depths": _child_named(b"bpcc", b"\x07\x07\x07"),
    "after-channel-definitions": _child_named(b"cdef", CDEF),
    "after-capture-resolution": _in_header(lambda kids: [_box(k, _in_resc(box, NAME)) if k == b"res " else box for k, box in kids]),
    "uuid-in-resolution": _in_header(
        lambda kids: [_box(k, box[8:] + _box(b"uuid", bytes(16) + NAME)) if k == b"res " else box for k, box in kids]
    ),
    "ftyp-compatibility": _ftyp(b"jp2 \0\0\0\0jp2 jpxbjpx " + NAME.ljust(24)),
    "ftyp-brand-and-version": _ftyp(NAME[:4] + NAME[4:8] + b"jp2 jpxbjpx " + NAME.ljust(24)),
    "rreq-past-its-fields": _replaced(b"rreq", lambda box: _box(b"rreq", box[8:] + NAME)),
    "second-signature": _replaced(b"ftyp", lambda box: box + _box(b"jP  ", NAME)),
}


def _written_frame(planted: bytes) -> tuple[bytes, Counter, bytes]:
    """The de-identified file's first frame, what was removed from its frames, and the file."""
    written, result = _deidentified(planted)
    assert NAME not in written
    return _frames(_read(written))[0], result.stream_metadata, written


@pytest.mark.parametrize("where", PLANTS)
def test_a_name_in_a_kept_box_is_removed_and_the_image_decodes_the_same(where):
    planted = _planted(GDCM, PLANTS[where])
    assert NAME in planted
    jp2, removed, written = _written_frame(planted)
    assert [kind for kind, _ in _top(jp2)] == [b"jP  ", b"ftyp", b"jp2h", b"jp2c"]
    assert dict(_top(jp2))[b"ftyp"] == _box(b"ftyp", b"jp2 \0\0\0\0jp2 jpxbjpx ")
    assert [box for kind, box in _header_children(jp2) if kind == b"colr"] == [SRGB]
    assert removed["JP2 uuid"] == 4 and removed["JP2 rreq"] == 1
    assert np.array_equal(_pixels(written), _pixels(_planted(GDCM, lambda f: f)))
    original = _frames(pydicom.dcmread(get_testdata_file(GDCM)))[0]
    assert np.array_equal(imagecodecs.jpeg2k_decode(jp2), imagecodecs.jpeg2k_decode(original))
    _offset_table_locates_every_frame(written)


ICC = {"JP2 colr ICC": 1}
RESC = _box(b"resc", b"\x0b\x12\x00\x01\x0b\x12\x00\x01\x00\x00")
COUNTED = [  # (plant, what the file loses besides GDCM's 4 UUID boxes and rreq, the header child it leaves)
    ("icc-profile", ICC, (b"colr", ENUMERATED_SRGB)),
    ("after-enumerated-colour", {"JP2 colr excess": 1}, (b"colr", ENUMERATED_SRGB)),
    ("after-image-header", {**ICC, "JP2 ihdr excess": 1}, (b"ihdr", b"\0\0\x01\x90\0\0\x01\x90\0\x03\x07\x07\x01\0")),
    ("after-bit-depths", {**ICC, "JP2 bpcc excess": 1}, (b"bpcc", b"\x07\x07\x07")),
    ("after-channel-definitions", {**ICC, "JP2 cdef excess": 1}, (b"cdef", CDEF)),
    ("after-capture-resolution", {**ICC, "JP2 res excess": 1}, (b"res ", RESC)),
    ("uuid-in-resolution", {**ICC, "JP2 res excess": 1}, (b"res ", RESC)),
    ("ftyp-compatibility", {**ICC, "JP2 ftyp excess": 1}, None),
    ("second-signature", {**ICC, "JP2 jP": 1}, None),
]


@pytest.mark.parametrize(("where", "lost", "child"), COUNTED, ids=[where for where, *_ in COUNTED])
def test_what_each_box_loses_is_counted_and_its_fields_stay(where, lost, child):
    jp2, removed, _ = _written_frame(_planted(GDCM, PLANTS[where]))
    assert removed == Counter({"JP2 uuid": 4, "JP2 rreq": 1, **lost})
    if child is not None:
        kind, content = child
        assert [box for k, box in _header_children(jp2) if k == kind] == [_box(kind, content)]


def test_a_palette_and_its_component_mapping_are_refused_with_the_name_after_their_fields():
    """Two palette entries of three 8-bit columns, one component mapped through each column, the name after each.
    Before, the name went and the palette stayed; a palette now sends the file to quarantine
    (tests/io/test_jp2_header_bounds.py: pydicom's OpenJPEG plugin writes its samples past its buffer)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    pclr = b"\x00\x02\x03\x07\x07\x07" + bytes(range(6))
    cmap = b"".join(struct.pack(">HBB", 0, 1, column) for column in range(3))
    jp2 = _greyscale_jp2(_frames(ds)[0], ds, GREYSCALE + _box(b"pclr", pclr + NAME) + _box(b"cmap", cmap + NAME))
    with pytest.raises(stream_metadata.DamagedFrame, match="has a palette"):
        stream_metadata._jp2(jp2)


def _greyscale_jp2(codestream: bytes, ds: pydicom.Dataset, colour: bytes) -> bytes:
    """A JP2 file around the 1-component codestream of `ds`, its colour given by `colour` (a colr box)."""
    depth = (ds.BitsStored - 1) | (0x80 if ds.PixelRepresentation else 0)
    ihdr = _box(b"ihdr", struct.pack(">LLHBBBB", ds.Rows, ds.Columns, 1, depth, 7, 0, 0))
    ftyp = _box(b"ftyp", b"jp2 \0\0\0\0jp2 ")
    return SIGNATURE + ftyp + _box(b"jp2h", ihdr + colour) + _box(b"jp2c", codestream)


def test_a_greyscale_images_icc_profile_becomes_the_greyscale_colour_space():
    """A monochrome input profile (restricted ICC, method 2) whose description names the patient."""
    profile = bytes(16) + b"GRAY" + bytes(108) + struct.pack(">L4sLL", 1, b"desc", 144, 12 + len(NAME)) + b"desc" + bytes(8) + NAME
    icc = _box(b"colr", b"\x02\x00\x00" + profile)
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    planted = _planted("MR_small_jp2klossless.dcm", lambda codestream: _greyscale_jp2(codestream, ds, icc))
    jp2, removed, written = _written_frame(planted)
    assert removed == Counter({"JP2 colr ICC": 1, "COM": 1})  # the comment is OpenJPEG's, in the codestream
    assert [box for kind, box in _header_children(jp2) if kind == b"colr"] == [GREYSCALE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(_pixels(written), ds.pixel_array)
    assert np.array_equal(imagecodecs.jpeg2k_decode(jp2), ds.pixel_array)


def test_a_jp2_file_with_only_what_a_reader_needs_is_left_as_it_is():
    """An enumerated colour, a File Type box of the family's brands: no edit, the frame byte for byte."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    codestream = _frames(ds)[0]
    codestream = stream_metadata._applied(codestream, stream_metadata._j2k(codestream).edits)  # OpenJPEG's comment
    jp2 = _greyscale_jp2(codestream, ds, GREYSCALE)
    assert stream_metadata._jp2(jp2).edits == []


def test_a_file_type_box_too_short_for_its_brand_is_refused():
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    jp2 = _greyscale_jp2(_frames(ds)[0], ds, GREYSCALE)
    short = jp2.replace(_box(b"ftyp", b"jp2 \0\0\0\0jp2 "), _box(b"ftyp", b"jp2 "))
    with pytest.raises(stream_metadata.DamagedFrame, match="File Type box"):
        stream_metadata._jp2(short)


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify"])
def test_ingest_pools_jp2_files_without_the_name_in_their_boxes(tmp_path, verify):
    files = {f"{where}.dcm": _planted(GDCM, plant) for where, plant in PLANTS.items()}
    for index, (name, data) in enumerate(files.items()):  # each its own image, so none is a copy of another
        ds = _read(data)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.9.7.{index + 1}"
        ds.PatientID = f"patient-{index}"
        files[name] = _encoded(ds)
    summary, rows, pooled = _ingested(tmp_path, files, verify)
    # OpenJPEG refuses a signature box after the first, and an image header or bit depths box longer than its fields:
    # --verify-pixels finds those files undecodable as sent (the structural check pools them, cleaned and decodable)
    undecodable = ("second-signature.dcm", "after-image-header.dcm", "after-bit-depths.dcm")
    refused = dict.fromkeys(undecodable, "undecodable_pixels") if verify else {}
    assert {name: row["reason"] for name, row in rows.items()} == refused, summary.line()
    assert len(pooled) == len(files) - len(refused)
    expected = _pixels(_planted(GDCM, lambda f: f))
    for path in pooled:
        assert NAME not in path.read_bytes() and COPYRIGHT not in path.read_bytes(), path.name
        assert np.array_equal(_pixels(path.read_bytes()), expected)


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
