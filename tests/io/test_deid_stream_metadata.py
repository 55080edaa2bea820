"""Metadata inside compressed frames, removed by de-identification: JPEG and JPEG-LS comment (COM) and application
(APPn) segments, JPEG 2000 comments in the main and tile-part headers, and the metadata boxes of a JP2 file. On
pydicom's real compressed test files with a name planted in a frame: the name is nowhere in the written file, the
pixels decode the same (pydicom's decoders, and dcmtk's where it has one), the offset tables still locate every frame,
and a frame whose segments cannot be walked is quarantined with what is wrong, never pooled."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import warnings
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, encapsulate_extended, generate_fragments, generate_frames, get_frame

from medtriage.errors import InputError
from medtriage.io import stream_metadata
from medtriage.io.deid import DeidOptions, deidentify
from medtriage.io.ingest_file import init_worker, process_file
from medtriage.io.part10 import encode
from medtriage.io.quarantine import screen
from medtriage.io.site_key import SiteKey
from medtriage.io.stream_metadata import stripped_pixel_data

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
NAME = b"QUIMBY^ESTELLE^PLANTED"  # in no pydicom test file
SOI, SOC = b"\xff\xd8", b"\xff\x4f"
DCMTK_DECOMPRESS = {  # dcmtk's decoders; it has none for JPEG 2000
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70"), "dcmdjpeg"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "dcmdjpls"),
}
needs_dcmtk = pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk is not installed")

_TLM_ENTRIES = stream_metadata._tlm_entries  # the real one, which a test counts the calls of


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def _com(text: bytes = NAME) -> bytes:
    return _segment(0xFFFE, text)


def _after_soi(frame: bytes, *segments: bytes) -> bytes:
    return frame[:2] + b"".join(segments) + frame[2:]


def _after_first_segment(frame: bytes, *segments: bytes) -> bytes:
    end = 4 + struct.unpack_from(">H", frame, 4)[0]
    return frame[:end] + b"".join(segments) + frame[end:]


def _after_siz(codestream: bytes, *segments: bytes) -> bytes:
    """JPEG 2000: SIZ must follow SOC at once, so main header segments go after it."""
    return _after_first_segment(codestream, *segments)


def _j2k_comment(text: bytes = NAME) -> bytes:
    return _segment(0xFF64, b"\x00\x01" + text)  # Rcom 1: Latin text


def _frames(ds: pydicom.Dataset) -> list[bytes]:
    count = int(ds.get("NumberOfFrames") or 1)
    tables = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths) if "ExtendedOffsetTable" in ds else None
    return list(generate_frames(ds.PixelData, number_of_frames=count, extended_offsets=tables))


def _planted(name: str, plant, frame: int = 0, extended: bool = False) -> bytes:
    """pydicom's test file `name` with frame `frame` replaced by `plant(frame)`, every frame behind a Basic Offset
    Table (or an Extended Offset Table), and what ingest needs to pool it: a Patient ID and no burned-in text."""
    ds = pydicom.dcmread(get_testdata_file(name))
    frames = _frames(ds)
    frames[frame] = plant(frames[frame])
    if extended:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    else:
        ds.PixelData = encapsulate(frames, has_bot=True)
    ds.PatientID, ds.BurnedInAnnotation = "patient-1", "NO"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _deidentified(data: bytes):
    """(the de-identified file as ingest writes it, the de-identification result)."""
    ds = _read(data)
    result = deidentify(ds, KEY)
    return encode(ds), result


def _pixels(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on the test files' own quirks
        return _read(data).pixel_array


def _offset_table_locates_every_frame(data: bytes) -> None:
    """Each entry of the Basic Offset Table (or Extended Offset Table) is where an item holding its frame starts, one
    entry per frame, every fragment of even length; and pydicom reads each frame alone from its entry as it reads it in
    item order."""
    ds = _read(data)
    pixel_data, count = ds.PixelData, int(ds.get("NumberOfFrames") or 1)
    table_length = struct.unpack_from("<L", pixel_data, 4)[0]
    first = 8 + table_length
    if "ExtendedOffsetTable" in ds:
        assert table_length == 0
        offsets = struct.unpack(f"<{count}Q", ds.ExtendedOffsetTable)
        lengths = struct.unpack(f"<{count}Q", ds.ExtendedOffsetTableLengths)
    else:
        assert table_length == 4 * count
        offsets, lengths = struct.unpack_from(f"<{count}L", pixel_data, 8), None
    in_order = _frames(ds)
    for index, offset in enumerate(offsets):
        tag, length = struct.unpack_from("<LL", pixel_data, first + offset)
        assert tag == 0xE000FFFE, f"entry {index} points at no item"
        assert pixel_data[first + offset + 8 :].startswith((SOI, SOC, b"\0\0\0\x0cjP  "))
        assert lengths is None or lengths[index] == length
        tables = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths) if lengths else None
        alone = get_frame(pixel_data, index, number_of_frames=count, extended_offsets=tables)
        assert alone == in_order[index]
    assert all(len(fragment) % 2 == 0 for fragment in generate_fragments(pixel_data[first:]))


def _dcmtk_reads(tmp_path, data: bytes) -> np.ndarray | None:
    """dcmdump reads the file without an error; where dcmtk decodes the syntax, the pixels it decompresses them to."""
    path = tmp_path / "deidentified.dcm"
    path.write_bytes(data)
    dump = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "E: " not in dump.stdout + dump.stderr, dump.stderr
    tool = DCMTK_DECOMPRESS.get(str(_read(data).file_meta.TransferSyntaxUID))
    if tool is None:
        return None
    native = tmp_path / "native.dcm"
    done = subprocess.run([tool, str(path), str(native)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return pydicom.dcmread(native).pixel_array


PLANTED_COMMENT = [  # (file, frame the comment goes into, where a codestream takes it)
    ("SC_rgb_jpeg_dcmtk.dcm", 0, _after_soi),  # baseline, JFIF
    ("JPGExtended.dcm", 0, _after_soi),  # extended (12 bit)
    ("JPEG-LL.dcm", 0, _after_soi),  # lossless, first-order prediction
    ("examples_ybr_color.dcm", 6, _after_soi),  # 30 baseline frames
    ("MR_small_jpeg_ls_lossless.dcm", 0, _after_soi),
    ("JPEGLSNearLossless_16.dcm", 0, _after_soi),
    ("emri_small_jpeg_ls_lossless.dcm", 3, _after_soi),  # 10 frames
    ("MR_small_jp2klossless.dcm", 0, _after_siz),
    ("JPEG2000.dcm", 0, _after_siz),
    ("emri_small_jpeg_2k_lossless.dcm", 3, _after_siz),  # 10 frames
]


@needs_dcmtk
@pytest.mark.parametrize(("name", "frame", "where"), PLANTED_COMMENT, ids=[c[0] for c in PLANTED_COMMENT])
def test_a_comment_planted_in_a_frame_is_removed_and_the_pixels_decode_the_same(tmp_path, name, frame, where):
    """Before, pixel data was never touched: the comment reached the pool with the name in it."""
    comment = _j2k_comment() if where is _after_siz else _com()
    planted = _planted(name, lambda f: where(f, comment), frame)
    written, result = _deidentified(planted)
    assert NAME not in written
    assert result.stream_metadata["COM"] >= 1
    assert np.array_equal(_pixels(written), _pixels(planted))
    _offset_table_locates_every_frame(written)
    before, after = _frames(_read(planted)), _frames(_read(written))
    untouched = [i for i, f in enumerate(before) if i != frame and not _holds_comment(f)]
    assert [after[i] for i in untouched] == [before[i] for i in untouched]  # not rewritten: byte for byte as read
    decoded = _dcmtk_reads(tmp_path, written)
    if decoded is not None:
        assert np.array_equal(decoded, _dcmtk_reads(tmp_path, planted))


def _holds_comment(frame: bytes) -> bool:
    """A JPEG 2000 encoder's own comment (OpenJPEG, Kakadu) in the main header: such frames are rewritten too."""
    return frame.startswith(SOC) and b"\xff\x64" in frame[: frame.find(b"\xff\x90")]


def test_application_segments_are_removed_but_jfif_and_adobe_stay():
    """EXIF (APP1), ICC (APP2) and Photoshop (APP13) segments can name the patient; JFIF (APP0) and Adobe (APP14) say
    how a decoder converts colour, and stay."""
    exif, icc, photoshop = (
        _segment(0xFFE1, b"Exif\0\0" + NAME),
        _segment(0xFFE2, b"ICC_PROFILE\0" + NAME),
        _segment(0xFFED, b"Photoshop 3.0\0" + NAME),
    )
    for name, kept in (("SC_rgb_jpeg_dcmtk.dcm", b"JFIF\0"), ("SC_rgb_jpeg_app14_dcmd.dcm", b"Adobe")):
        planted = _planted(name, lambda f: _after_first_segment(f, _com(), exif, icc, photoshop))
        written, result = _deidentified(planted)
        assert NAME not in written and b"Exif" not in written and b"Photoshop" not in written
        assert kept in _frames(_read(written))[0][:40]
        assert result.stream_metadata == Counter({"COM": 1, "APP1": 1, "APP2": 1, "APP13": 1})
        assert np.array_equal(_pixels(written), _pixels(planted))


# Files as modalities and converters wrote them, with the metadata they left: a lossless JPEG's LJIF header and comment,
# JPEG-LS with a SPIFF header, encoders' names in JPEG 2000 comments, a JP2 file's UUID boxes; and files without any.
AS_WRITTEN = {
    "JPGLosslessP14SV1_1s_1f_8b.dcm": {"APP0": 1, "COM": 1},
    "SC_rgb_jls_lossy_line.dcm": {"APP8": 2},
    "J2K_pixelrep_mismatch.dcm": {"COM": 1},
    "693_J2KR.dcm": {"COM": 1},
    "GDCMJ2K_TextGBR.dcm": {"JP2 uuid": 4, "JP2 rreq": 1, "JP2 colr ICC": 1},  # Apple's ICC profile: test_jp2_boxes
    "JPGExtended.dcm": {},
    "emri_small_jpeg_ls_lossless.dcm": {},
    "SC_rgb_jpeg_app14_dcmd.dcm": {},
}


@pytest.mark.parametrize(("name", "removed"), AS_WRITTEN.items(), ids=list(AS_WRITTEN))
def test_metadata_the_writers_left_is_removed_and_frames_without_any_stay_as_read(name, removed):
    original = get_testdata_file(name)
    ds = pydicom.dcmread(original)
    ds.PatientID = "patient-1"
    pixel_data = ds.PixelData
    result = deidentify(ds, KEY)
    assert result.stream_metadata == Counter(removed)
    assert (ds.PixelData is pixel_data) == (not removed)  # nothing to remove: not even re-encapsulated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(original).pixel_array)


def _first_tile_part(codestream: bytes) -> int:
    position = 2
    while codestream[position : position + 2] != b"\xff\x90":
        position += 2 + struct.unpack_from(">H", codestream, position + 2)[0]
    return position


def _tile_part_comment_and_length_table(codestream: bytes) -> bytes:
    """A comment in the tile-part header (its Psot grown to match) and a TLM segment giving that tile-part's length."""
    sot = _first_tile_part(codestream)
    psot = struct.unpack_from(">L", codestream, sot + 6)[0]
    assert psot and sot + psot + 2 == len(codestream.rstrip(b"\0")), "one tile-part, then EOC"
    comment = _j2k_comment()
    grown = struct.pack(">L", psot + len(comment))
    tile_part = codestream[sot : sot + 6] + grown + codestream[sot + 10 : sot + 12] + comment + codestream[sot + 12 :]
    tlm = _segment(0xFF55, b"\x00\x40" + grown)  # Ztlm 0; Stlm: no tile index, 32-bit lengths
    return _after_siz(codestream[:sot], tlm) + tile_part


def test_a_comment_in_a_tile_part_header_is_removed_and_the_tile_part_lengths_follow():
    planted = _planted("MR_small_jp2klossless.dcm", _tile_part_comment_and_length_table)
    written, _ = _deidentified(planted)
    assert NAME not in written
    codestream = _frames(_read(written))[0]
    sot = _first_tile_part(codestream)
    psot = struct.unpack_from(">L", codestream, sot + 6)[0]
    assert codestream[sot + psot : sot + psot + 2] == b"\xff\xd9"  # the tile-part ends where its length says
    tlm = codestream.index(b"\xff\x55")
    assert struct.unpack_from(">L", codestream, tlm + 6)[0] == psot
    assert np.array_equal(_pixels(written), _pixels(planted))


def test_a_jp2_files_metadata_boxes_are_removed_and_its_codestream_cleaned():
    """GDCM wrote JP2 files (a codestream inside boxes) into JPEG 2000 pixel data: an XML box names the patient."""
    xml = b"<patient>" + NAME + b"</patient>"

    def plant(jp2: bytes) -> bytes:
        at = jp2.index(b"uuid") - 4
        box = struct.pack(">L", 8 + len(xml)) + b"xml " + xml
        codestream = jp2.index(b"jp2c") + 4
        with_comment = _after_siz(jp2[codestream:], _j2k_comment())
        grown = struct.pack(">L", 8 + len(with_comment))
        return jp2[:at] + box + jp2[at : codestream - 8] + grown + b"jp2c" + with_comment

    planted = _planted("GDCMJ2K_TextGBR.dcm", plant)
    written, result = _deidentified(planted)
    assert NAME not in written and b"uuid" not in written
    assert result.stream_metadata == Counter({"JP2 xml": 1, "JP2 uuid": 4, "COM": 1, "JP2 rreq": 1, "JP2 colr ICC": 1})
    assert np.array_equal(_pixels(written), _pixels(planted))
    _offset_table_locates_every_frame(written)


@needs_dcmtk
def test_an_extended_offset_table_is_rebuilt(tmp_path):
    planted = _planted("emri_small_jpeg_2k_lossless.dcm", lambda f: _after_siz(f, _j2k_comment()), 2, extended=True)
    written, _ = _deidentified(planted)
    assert NAME not in written
    _offset_table_locates_every_frame(written)
    assert np.array_equal(_pixels(written), _pixels(planted))
    _dcmtk_reads(tmp_path, written)


@pytest.fixture
def ingest_one(tmp_path):
    init_worker(KEY, DeidOptions(), frozenset(), False)

    def ingest(data: bytes):
        path = tmp_path / "image.dcm"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return process_file(str(path))

    return ingest


def test_ingest_pools_the_file_without_the_planted_comment(ingest_one):
    outcome = ingest_one(_planted("examples_ybr_color.dcm", lambda f: _after_soi(f, _com()), 6))
    assert outcome.status == "pending", outcome
    assert NAME not in outcome.encoded


def _past_the_end(frame: bytes) -> bytes:
    return _after_soi(frame, struct.pack(">HH", 0xFFFE, 0x7FFF) + NAME)


def _j2k_past_the_end(codestream: bytes) -> bytes:
    return _after_siz(codestream, struct.pack(">HHH", 0xFF64, 0x7FFF, 1) + NAME)


def _j2k_tile_part_past_its_end(codestream: bytes) -> bytes:
    sot = _first_tile_part(codestream)
    return codestream[: sot + 12] + struct.pack(">HH", 0xFF64, 0x7FFF) + NAME + codestream[sot + 12 :]


DAMAGED = [  # (file, frame, damage, what the reason says)
    ("SC_rgb_jpeg_dcmtk.dcm", 0, _past_the_end, "segment FFFE at byte 2 declares 32767 bytes"),
    ("emri_small_jpeg_ls_lossless.dcm", 4, _past_the_end, "frame 5: marker segment FFFE"),
    ("MR_small_jp2klossless.dcm", 0, _j2k_past_the_end, "segment FF64 at byte"),
    ("MR_small_jp2klossless.dcm", 0, _j2k_tile_part_past_its_end, "segment FF64 at byte"),
    ("SC_rgb_jpeg_dcmtk.dcm", 0, lambda f: NAME + f, "does not start with a start-of-image marker (FFD8)"),
    ("emri_small_jpeg_2k_lossless.dcm", 1, lambda f: NAME + f, "frame 2: does not start with"),
]


@pytest.mark.parametrize(("name", "frame", "damage", "said"), DAMAGED, ids=[f"{d[0]}-{i}" for i, d in enumerate(DAMAGED)])
def test_a_frame_whose_segments_cannot_be_walked_is_quarantined_with_what_is_wrong(ingest_one, name, frame, damage, said):
    """A length past the frame's end, or no start marker: where the metadata is cannot be known, so nothing is guessed.
    Before, the file was pooled with the name inside the frame."""
    damaged = _planted(name, damage, frame)
    outcome = ingest_one(damaged)
    assert (outcome.status, outcome.reason) == ("quarantined", "damaged_compressed_frame"), outcome
    assert said in outcome.detail and not outcome.encoded
    assert screen(_read(damaged)).reason == "damaged_compressed_frame"
    with pytest.raises(InputError, match="cannot be de-identified"):
        deidentify(_read(damaged), KEY)


def test_a_frame_without_fragments_stays_without_them_when_another_frame_is_cleaned():
    """A Basic Offset Table whose first two entries are equal gives frame 1 no fragments. Before, re-encapsulating
    copied for it the bytes from the table's end to as far as its last entry said: the other frames again, the comment
    among them, uncleaned."""
    ds = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))
    frames = _frames(ds)
    frames[3] = _after_soi(frames[3], _com())
    pixel_data = encapsulate(frames, has_bot=True)
    offsets = struct.unpack_from(f"<{len(frames)}L", pixel_data, 8)
    table = struct.pack(f"<{len(frames) + 1}L", 0, *offsets)
    ds.PixelData = struct.pack("<HHL", 0xFFFE, 0xE000, len(table)) + table + pixel_data[8 + 4 * len(frames) :]
    ds.NumberOfFrames, ds.PatientID = len(frames) + 1, "patient-1"
    deidentify(ds, KEY)
    assert NAME not in ds.PixelData
    assert len(ds.PixelData) == len(pixel_data) + 4 - len(_com())
    cleaned = list(generate_frames(ds.PixelData, number_of_frames=len(frames) + 1))
    assert cleaned[0] == b"" and cleaned[1:4] == frames[:3] and cleaned[5:] == frames[4:]


def test_bytes_past_an_extended_offset_table_length_are_quarantined():
    """An Extended Offset Table's length may end a frame before its item does. Before, what lay between was never
    walked, and a frame without metadata kept its item whole: a comment hidden there reached the pool."""
    ds = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))
    frames = _frames(ds)
    hidden = _com() + b"\0" * (len(_com()) % 2)
    pixel_data, table, lengths = encapsulate_extended(frames)
    first = struct.unpack_from("<L", pixel_data, 12)[0]
    grown = struct.pack("<HHL", 0xFFFE, 0xE000, first + len(hidden)) + pixel_data[16 : 16 + first] + hidden
    offsets = struct.unpack(f"<{len(frames)}Q", table)
    ds.PixelData = pixel_data[:8] + grown + pixel_data[16 + first :]
    ds.ExtendedOffsetTable = struct.pack(f"<{len(frames)}Q", 0, *(o + len(hidden) for o in offsets[1:]))
    ds.ExtendedOffsetTableLengths, ds.PatientID, ds.BurnedInAnnotation = lengths, "patient-1", "NO"
    assert "past the length its offset table gives it" in screen(ds).detail
    with pytest.raises(InputError, match="cannot be de-identified"):
        deidentify(ds, KEY)


def test_a_jfif_thumbnail_and_bytes_after_a_kept_segment_are_removed():
    """JFIF and Adobe segments stay for the colour they describe, but their length may run past those fields: a
    thumbnail, or whatever a writer appends. Before, the name there reached the pool."""
    thumbnail = b"\x02\x01" + NAME[:6]  # 2 x 1 RGB pixels
    planted = _planted(
        "SC_rgb_jpeg_dcmtk.dcm",
        lambda f: f[:2] + _segment(0xFFE0, f[6:18] + thumbnail + NAME) + f[4 + struct.unpack_from(">H", f, 4)[0] :],
    )
    written, result = _deidentified(planted)
    assert NAME[:6] not in written
    assert result.stream_metadata == Counter({"APP0 excess": 1})
    assert _frames(_read(written))[0].startswith(SOI + _segment(0xFFE0, b"JFIF\0\x01\x01\x00\x00\x01\x00\x01\x00\x00"))
    assert np.array_equal(_pixels(written), _pixels(planted))


def _tile_parts_with_comments(count: int) -> bytes:
    """A codestream of `count` tile-parts, each with a comment, and TLM segments listing their lengths (not decodable:
    what the walk reads is its markers)."""
    siz = _segment(0xFF51, bytes(38))
    comment = _segment(0xFF64, b"\0\1\x55\x55")
    tile_part = struct.pack(">HHHLBB", 0xFF90, 10, 0, 12 + len(comment) + 2, 0, 1) + comment + b"\xff\x93"
    per_segment = (0xFFFF - 4) // 4
    tlms = [
        _segment(0xFF55, bytes([z, 0x40]) + struct.pack(">L", len(tile_part)) * min(per_segment, count - z * per_segment))
        for z in range(-(-count // per_segment))
    ]
    return SOC + siz + b"".join(tlms) + tile_part * count + b"\xff\xd9"


def test_thousands_of_tile_parts_losing_a_comment_list_the_tlm_entries_once(monkeypatch):
    """Before, each tile-part that lost a comment listed every TLM entry again: quadratic in the tile-parts."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.PixelData = encapsulate([_tile_parts_with_comments(20_000)], has_bot=True)
    listed = []
    monkeypatch.setattr(stream_metadata, "_tlm_entries", lambda *a: listed.append(a) or _TLM_ENTRIES(*a))
    stripped = stripped_pixel_data(ds, "1.2.840.10008.1.2.4.90")
    # each TLM segment (20,000 entries fill two) listed once for all the tile-parts, not once per tile-part
    assert len(listed) == len({start for _, start, _ in listed}) == 2
    assert stripped.removed == Counter({"COM": 20_000})
    codestream = next(generate_frames(stripped.pixel_data, number_of_frames=1))
    assert codestream.count(struct.pack(">L", 14)) >= 2 * 20_000  # each Psot and its TLM entry, 8 bytes shorter


def _box(kind: bytes, content: bytes, extended: bool = False) -> bytes:
    if extended:  # length 1, then a 64-bit length after the type
        return struct.pack(">L", 1) + kind + struct.pack(">Q", 16 + len(content)) + content
    return struct.pack(">L", 8 + len(content)) + kind + content


def _boxes(data: bytes, start: int, stop: int) -> list[tuple[bytes, bytes]]:
    """(type, whole box) of each box from `start` to `stop`, read by their 32-bit or 64-bit lengths."""
    found = []
    while start < stop:
        length, kind = struct.unpack_from(">L4s", data, start)
        length = struct.unpack_from(">Q", data, start + 8)[0] if length == 1 else length
        found.append((kind, data[start : start + length]))
        start += length
    return found


def _jp2_header(jp2: bytes) -> tuple[int, int, int]:
    """(start, header size, end) of the JP2 Header box of a JP2 file."""
    at = jp2.index(b"jp2h") - 4
    length = struct.unpack_from(">L", jp2, at)[0]
    header = 16 if length == 1 else 8
    return at, header, at + (struct.unpack_from(">Q", jp2, at + 8)[0] if length == 1 else length)


def _in_jp2_header(*children: bytes, extended: bool = False, after: int = 1, without: tuple[bytes, ...] = ()):
    """A plant putting `children` in the JP2 Header box after its first `after` children (its length grown to match,
    in the 64-bit form where `extended`), its children of the types `without` and GDCM's top-level UUID boxes
    removed."""

    def plant(jp2: bytes) -> bytes:
        at, header, stop = _jp2_header(jp2)
        kept = [box for kind, box in _boxes(jp2, at + header, stop) if kind not in without]
        jp2h = _box(b"jp2h", b"".join(kept[:after] + list(children) + kept[after:]), extended)
        rest = b"".join(box for kind, box in _boxes(jp2, stop, jp2.index(b"jp2c") - 4) if kind != b"uuid")
        return jp2[:at] + jp2h + rest + jp2[jp2.index(b"jp2c") - 4 :]

    return plant


def _reader_needs(jp2: bytes) -> bytes:
    """GDCM's JP2 file as de-identification leaves it: its ICC profile an enumerated colour, no Reader Requirements
    (tests/io/test_jp2_boxes.py), no UUID boxes."""
    return stream_metadata._applied(jp2, stream_metadata._jp2(jp2).edits)


RESOLUTION = struct.pack(">4H2b", 72, 254, 72, 254, 2, 2)  # 72 dpi, as grid points a metre (T.800 I.5.3.7.1)
HIDDEN_IN_JP2_HEADER = (_box(b"uuid", bytes(16) + NAME), _box(b"xml ", b"<patient>" + NAME + b"</patient>"))


@pytest.mark.parametrize("extended", [False, True], ids=["32-bit", "64-bit"])
def test_metadata_boxes_inside_the_jp2_header_are_removed_and_its_length_follows(extended):
    """The JP2 Header box was kept whole: a UUID or XML box nested in it, beside the image header and colour boxes,
    reached the pool with the patient's name."""
    planted = _planted("GDCMJ2K_TextGBR.dcm", _in_jp2_header(*HIDDEN_IN_JP2_HEADER, extended=extended))
    without = _deidentified(_planted("GDCMJ2K_TextGBR.dcm", _in_jp2_header(extended=extended)))[0]
    written, result = _deidentified(planted)
    assert NAME not in written
    assert result.stream_metadata == Counter({"JP2 uuid": 1, "JP2 xml": 1, "JP2 rreq": 1, "JP2 colr ICC": 1})
    jp2 = _frames(_read(written))[0]
    assert jp2 == _frames(_read(without))[0]  # every other box as it is without the hidden ones
    at, header, stop = _jp2_header(jp2)
    assert header == (16 if extended else 8)
    assert [kind for kind, _ in _boxes(jp2, at + header, stop)] == [b"ihdr", b"colr", b"res "]
    assert jp2[stop + 4 : stop + 8] == b"jp2c"  # the next box starts where the header's length says it ends
    assert np.array_equal(_pixels(written), _pixels(planted))
    _offset_table_locates_every_frame(written)


def test_every_standard_child_of_the_jp2_header_stays_and_only_the_others_go():
    """The header's optional boxes (bit depths, channel definitions, a second colour specification, resolution with
    its capture and display boxes) stay byte for byte around a removed UUID box. A palette and its component mapping
    are refused (tests/io/test_jp2_header_bounds.py)."""
    resolution = _box(b"res ", _box(b"resc", RESOLUTION) + _box(b"resd", RESOLUTION))
    standard = [_box(b"bpcc", b"\x07\x07\x07"), _box(b"colr", b"\x01\x00\x00\x00\x00\x00\x10"), resolution]
    standard += [_box(b"cdef", b"\x00\x03" + b"".join(struct.pack(">HHH", channel, 0, channel + 1) for channel in range(3)))]
    gdcm = _reader_needs(_frames(pydicom.dcmread(get_testdata_file("GDCMJ2K_TextGBR.dcm")))[0])
    jp2 = _in_jp2_header(standard[0], HIDDEN_IN_JP2_HEADER[0], *standard[1:], without=(b"res ",))(gdcm)  # one allowed
    walk = stream_metadata._jp2(jp2)
    assert walk.removed == Counter({"JP2 uuid": 1})
    assert stream_metadata._applied(jp2, walk.edits) == _in_jp2_header(*standard, without=(b"res ",))(gdcm)


@pytest.mark.parametrize(
    "past",
    [struct.pack(">L", 0x7FFF) + b"uuid" + NAME, struct.pack(">L", 1) + b"uuid" + struct.pack(">Q", 0x7FFF) + NAME],
    ids=["32-bit", "64-bit"],
)
def test_a_child_running_past_the_end_of_the_jp2_header_is_quarantined(ingest_one, past):
    """A child box (32-bit or 64-bit length) longer than the header holding it: where the header's metadata ends cannot
    be known. Before, the header was kept whole and the file pooled, the name inside it."""
    damaged = _planted("GDCMJ2K_TextGBR.dcm", _in_jp2_header(past))
    assert screen(_read(damaged)).reason == "damaged_compressed_frame"
    outcome = ingest_one(damaged)
    assert (outcome.status, outcome.reason) == ("quarantined", "damaged_compressed_frame"), outcome
    assert "past the end of the JP2 Header box" in outcome.detail and not outcome.encoded


def test_a_jp2_header_with_only_standard_children_is_left_as_it_is():
    """Nothing to remove: no edit, so the frame's item stays byte for byte."""
    jp2 = _reader_needs(_frames(pydicom.dcmread(get_testdata_file("GDCMJ2K_TextGBR.dcm")))[0])
    only_standard = _in_jp2_header(_box(b"res ", _box(b"resd", RESOLUTION)), extended=True, without=(b"res ",))(jp2)
    assert stream_metadata._jp2(only_standard).edits == []
    ds = _read(_planted("GDCMJ2K_TextGBR.dcm", lambda frame: _in_jp2_header()(_reader_needs(frame))))
    pixel_data = ds.PixelData
    deidentify(ds, KEY)
    assert ds.PixelData is pixel_data
