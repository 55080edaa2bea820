"""A viewer and the training loader read Number of Frames frames and no more, so a whole frame past that count (a photo
of a face, a scanned requisition form with the name) is a picture nobody looks at. Before, such a frame was walked,
cleaned of its metadata and pooled with its picture: the file is now quarantined as damaged_compressed_frame, naming
the frame, in JPEG, JPEG-LS, JPEG 2000, RLE and Encapsulated Uncompressed, behind a Basic Offset Table, an Extended
Offset Table or none. Frames that span several fragments are pooled as before: only whole frames past the count, where
the items tell them apart (an offset table's entries, end-of-image markers, one fragment a frame in RLE and
Encapsulated Uncompressed), are refused."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import generate_uid

from medtriage.errors import InputError
from medtriage.io import stream_metadata
from medtriage.io.deid import deidentify
from medtriage.io.quarantine import screen
from tests.io.test_deid_stream_metadata import NAME, _frames
from tests.io.test_encapsulated_uncompressed_unread_bytes import _native_frames
from tests.io.test_unwalked_syntaxes import KEY, _ingested

UNCOMPRESSED = "1.2.840.10008.1.2.1.98"


def _in_scan(frame: bytes) -> bytes:
    """A JPEG or JPEG-LS frame with the name in its entropy-coded data, which the walk copies as it is."""
    sos = frame.index(b"\xff\xda")
    (length,) = struct.unpack_from(">H", frame, sos + 2)
    return frame[: sos + 2 + length] + NAME + frame[sos + 2 + length :]


def _in_tile_part(frame: bytes) -> bytes:
    """A JPEG 2000 codestream with the name in its first tile-part's packet data, its length (Psot) following."""
    sot, sod = frame.index(b"\xff\x90"), frame.index(b"\xff\x93")
    (psot,) = struct.unpack_from(">L", frame, sot + 6)
    grown = frame[: sot + 6] + struct.pack(">L", psot + len(NAME) if psot else 0) + frame[sot + 10 : sod + 2]
    return grown + NAME + frame[sod + 2 :]


def _rle_picture(frame: bytes, rows: int, columns: int) -> bytes:
    """An RLE frame with as many segments as `frame`, each the name over and over in literal runs: a decoder reads all
    of it."""
    (count,) = struct.unpack_from("<L", frame)
    samples = (NAME * (rows * columns // len(NAME) + 1))[: rows * columns]
    runs = b"".join(bytes([len(samples[i : i + 128]) - 1]) + samples[i : i + 128] for i in range(0, len(samples), 128))
    segment = runs + b"\0" * (len(runs) % 2)
    offsets = [64 + index * len(segment) for index in range(count)]
    return struct.pack("<16L", count, *offsets, *[0] * (15 - count)) + segment * count


SAMPLES = {  # family: (pydicom's multi-frame file, syntax to write it under or None, a frame holding the name)
    "jpeg": ("examples_ybr_color.dcm", None, lambda ds, frame: _in_scan(frame)),
    "jpeg-ls": ("emri_small_jpeg_ls_lossless.dcm", None, lambda ds, frame: _in_scan(frame)),
    "j2k": ("emri_small_jpeg_2k_lossless.dcm", None, lambda ds, frame: _in_tile_part(frame)),
    "rle": ("SC_rgb_rle_2frame.dcm", None, lambda ds, frame: _rle_picture(frame, ds.Rows, ds.Columns)),
    "uncompressed": ("SC_rgb_2frame.dcm", UNCOMPRESSED, lambda ds, frame: (NAME * len(frame))[: len(frame)]),
}
STREAMS = ("jpeg", "jpeg-ls", "j2k")


def _extended(frames):
    pixel_data, table, lengths = encapsulate_extended(frames)
    return pixel_data, (table, lengths)


LAYOUTS = {  # name: (pixel data and Extended Offset Table of the frames, families it applies to)
    "basic table": (lambda frames: (encapsulate(frames, has_bot=True), None), tuple(SAMPLES)),
    "no table": (lambda frames: (encapsulate(frames, has_bot=False), None), tuple(SAMPLES)),
    "extended table": (_extended, tuple(SAMPLES)),
    # a frame over several fragments: by its entries, or (no table) up to the fragment ending in its end marker
    "3 fragments a frame, basic table": (lambda f: (encapsulate(f, fragments_per_frame=3, has_bot=True), None), tuple(SAMPLES)),
    "3 fragments a frame, no table": (lambda f: (encapsulate(f, fragments_per_frame=3, has_bot=False), None), STREAMS),
}
CASES = [(family, layout) for layout, (_, families) in LAYOUTS.items() for family in families]


def _file(family: str, layout: str, hidden: bool) -> bytes:
    """The family's sample, Number of Frames as it is, its frames laid out by `layout`, and (`hidden`) a frame holding
    the name after them; ready to pool otherwise (its own SOP Instance UID, a Patient ID, no burned-in text)."""
    name, syntax, picture = SAMPLES[family]
    ds = pydicom.dcmread(get_testdata_file(name))
    frames = _native_frames(ds) if syntax == UNCOMPRESSED else _frames(ds)
    frames = [*frames, picture(ds, frames[0])] if hidden else frames
    ds.PixelData, extended = LAYOUTS[layout][0](frames)
    if extended:
        ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = extended
    return _ready_to_pool(ds, syntax)


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


PYDICOM_MULTI_FRAME = [
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_RLE.dcm",  # a Basic Offset Table
    "examples_ybr_color.dcm",
    "color3d_jpeg_baseline.dcm",  # 120 frames, no table
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "OBXXXX1A_rle_2frame.dcm",
    "rtdose_rle.dcm",  # 15 frames, no table
]


@pytest.mark.parametrize("name", PYDICOM_MULTI_FRAME)
def test_pydicoms_multi_frame_files_hold_no_frame_past_the_count(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    assert stream_metadata.frames_past_count(ds, syntax) is None and stream_metadata.damaged_frame(ds, syntax) is None


@pytest.mark.parametrize("family", SAMPLES)
def test_the_planted_frame_is_one_the_checks_pass_where_it_is_counted(family):
    """The name survives the walk in a frame within the count: only the count can keep it from the pool."""
    name, syntax, picture = SAMPLES[family]
    ds = _read(_file(family, "basic table", hidden=False))
    frames = _native_frames(ds) if syntax == UNCOMPRESSED else _frames(ds)
    ds.PixelData = encapsulate([picture(ds, frames[0]), *frames[1:]], has_bot=True)
    assert NAME in ds.PixelData and screen(ds) is None


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{layout}" for f, layout in CASES])
def test_frames_as_written_are_screened_as_safe(family, layout):
    assert screen(_read(_file(family, layout, hidden=False))) is None


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{layout}" for f, layout in CASES])
def test_a_frame_past_number_of_frames_is_quarantined(family, layout):
    ds = _read(_file(family, layout, hidden=True))
    claimed = int(ds.NumberOfFrames)
    unsafe = screen(ds)
    assert unsafe is not None and unsafe.reason == "damaged_compressed_frame", unsafe
    assert f"frame {claimed + 1}" in unsafe.detail and "Number of Frames" in unsafe.detail, unsafe.detail
    assert "re-export" in unsafe.detail, unsafe.detail


def _jp2_with(frame: bytes, codestream: bytes) -> bytes:
    """The JP2 file `frame` with `codestream` in its codestream box (the last box), and no padding after it."""
    at = frame.index(b"jp2c") - 4
    return frame[:at] + struct.pack(">L", 8 + len(codestream)) + b"jp2c" + codestream


def _codestream(jp2: bytes) -> bytes:
    at = jp2.index(b"jp2c") - 4
    return jp2[at + 8 : at + struct.unpack_from(">L", jp2, at)[0]]


def _even_jp2(frame: bytes) -> bytes:
    """The JP2 file `frame` of an even length, its codestream padded inside its box: what follows in the next
    fragment is read on from the next box, as a box."""
    grown = _jp2_with(frame, _codestream(frame))
    return _jp2_with(frame, _codestream(frame) + b"\0" * (len(grown) % 2))


@pytest.mark.parametrize("family", SAMPLES)
def test_a_frame_past_the_count_that_its_table_joins_to_the_last_is_quarantined(family):
    """A Basic Offset Table of Number of Frames entries, one more frame's fragment after the last: decoders join it to
    the last frame and read that up to its end, so it is the last frame that holds bytes no decoder reads."""
    ds = _read(_file(family, "basic table", hidden=False))
    name, syntax, picture = SAMPLES[family]
    frames = _native_frames(ds) if syntax == UNCOMPRESSED else _frames(ds)
    hidden = picture(ds, frames[0])
    ds.PixelData += struct.pack("<HHL", 0xFFFE, 0xE000, len(hidden) + len(hidden) % 2) + hidden + b"\0" * (len(hidden) % 2)
    unsafe = screen(ds)
    assert unsafe is not None and unsafe.reason == "damaged_compressed_frame", unsafe
    assert f"frame {len(frames)}: " in unsafe.detail, unsafe.detail


SINGLE = {  # family: (pydicom's one-frame file, syntax to write it under or None, its frame, a frame holding the name)
    "jpeg": ("SC_rgb_jpeg_dcmtk.dcm", None, None, lambda ds, frame: _in_scan(frame)),
    "j2k": ("MR_small_jp2klossless.dcm", None, None, lambda ds, frame: _in_tile_part(frame)),
    "jp2": ("GDCMJ2K_TextGBR.dcm", None, _even_jp2, lambda ds, frame: _jp2_with(frame, _in_tile_part(_codestream(frame)))),
    "rle": ("MR_small_RLE.dcm", None, None, lambda ds, frame: _rle_picture(frame, ds.Rows, ds.Columns)),
    "uncompressed": ("CT_small.dcm", UNCOMPRESSED, None, lambda ds, frame: (NAME * len(frame))[: len(frame)]),
}


def _one_frame_and_a_hidden_one(family: str) -> bytes:
    """One frame claimed, a second after it in a fragment of its own, no offset table: a decoder takes the fragments
    for one frame and reads it up to its end (its marker, its samples)."""
    name, syntax, first, picture = SINGLE[family]
    ds = pydicom.dcmread(get_testdata_file(name))
    frame = (_native_frames(ds) if syntax == UNCOMPRESSED else _frames(ds))[0]
    ds.PixelData = encapsulate([first(frame) if first else frame, picture(ds, frame)], has_bot=False)
    return _ready_to_pool(ds, syntax)


@pytest.mark.parametrize("family", SINGLE)
def test_a_second_frame_after_the_only_one_claimed_is_quarantined(family):
    ds = _read(_one_frame_and_a_hidden_one(family))
    assert "NumberOfFrames" not in ds or int(ds.NumberOfFrames) == 1
    unsafe = screen(ds)
    assert unsafe is not None and unsafe.reason == "damaged_compressed_frame", unsafe
    assert "frame 1" in unsafe.detail, unsafe.detail


def test_ingest_pools_the_frames_as_written_and_quarantines_a_frame_past_the_count(tmp_path):
    files = {}
    for family in SAMPLES:
        files[f"{family}-as-written.dcm"] = _file(family, "3 fragments a frame, basic table", hidden=False)
        files[f"{family}-hidden-basic.dcm"] = _file(family, "basic table", hidden=True)
        files[f"{family}-hidden-extended.dcm"] = _file(family, "extended table", hidden=True)
    for family in STREAMS:
        files[f"{family}-hidden-no-table.dcm"] = _file(family, "3 fragments a frame, no table", hidden=True)
    files["jp2-hidden-second-file.dcm"] = _one_frame_and_a_hidden_one("jp2")
    summary, rows, pooled = _ingested(tmp_path, files, verify=False)
    hidden = {name for name in files if "hidden" in name}
    assert {name: row["reason"] for name, row in rows.items()} == dict.fromkeys(hidden, "damaged_compressed_frame")
    assert len(pooled) == len(files) - len(hidden), summary.line()
    for path in pooled:
        assert NAME not in path.read_bytes()


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify"])
def test_ingest_pools_a_multi_frame_file_and_quarantines_one_with_a_frame_more(tmp_path, verify):
    files = {
        "as-written.dcm": _file("j2k", "basic table", hidden=False),
        "hidden.dcm": _file("j2k", "no table", hidden=True),
    }
    summary, rows, pooled = _ingested(tmp_path, files, verify)
    assert {name: row["reason"] for name, row in rows.items()} == {"hidden.dcm": "damaged_compressed_frame"}, summary.line()
    assert "frame 11" in rows["hidden.dcm"]["detail"] and "Number of Frames (10)" in rows["hidden.dcm"]["detail"]
    assert len(pooled) == 1 and NAME not in pooled[0].read_bytes()
    assert len(_frames(pydicom.dcmread(pooled[0]))) == 10


@pytest.mark.parametrize("family", STREAMS)
def test_de_identification_refuses_a_frame_past_the_count_too(family):
    """Any caller, not only ingest: the frame is neither cleaned nor dropped, and the data set is left as it was."""
    ds = _read(_file(family, "basic table", hidden=True))
    before = ds.PixelData
    with pytest.raises(InputError, match=f"cannot be de-identified: frame {int(ds.NumberOfFrames) + 1} of the"):
        deidentify(ds, KEY)
    assert ds.PixelData == before


def _ready_to_pool(ds: pydicom.Dataset, syntax: str | None) -> bytes:
    """`ds` written in `syntax` (encapsulated pixel data as OB) with its own SOP Instance UID, a Patient ID and no
    burned-in text: what screening asks of a file before it looks at its frames."""
    if syntax:
        ds["PixelData"].VR, ds.file_meta.TransferSyntaxUID = "OB", syntax
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.BurnedInAnnotation = "patient-1", "NO"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()
