"""Encapsulated pixel data in a syntax whose stream de-identification does not walk (MPEG-2, H.264, HEVC, JPEG XL,
JPIP, SMPTE ST 2110, private ones): text in it (MPEG user data, SEI messages, Exif or XMP boxes) cannot be found, so
ingest quarantines the file as unwalked_compression, with or without --verify-pixels. RLE holds samples only and
Deflated Explicit VR is native pixel data: both are still pooled."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from medtriage.errors import InputError
from medtriage.io.deid import deidentify
from medtriage.io.ingest import ingest_site
from medtriage.io.quarantine import screen
from medtriage.io.site_key import SiteKey
from medtriage.io.stream_metadata import STREAM_SYNTAXES
from tests.io.test_deid_stream_metadata import NAME

KEY = SiteKey(b"unwalked-syntaxes-secret-0123456789ab")
RLE, ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.98"  # samples only: nothing to walk
JPEG_XL = ("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112")  # unknown to pydicom 3.0
PRIVATE = "1.2.826.0.1.3680043.9.7"  # a vendor's own
# Every encapsulated syntax pydicom knows that is not walked, JPEG XL, and a private one
UNWALKED = sorted(
    {
        uid
        for uid, (_, kind, *_) in UID_dictionary.items()
        if kind == "Transfer Syntax" and UID(uid).is_encapsulated and uid not in STREAM_SYNTAXES | {RLE, ENCAPSULATED_UNCOMPRESSED}
    }
    | {*JPEG_XL, PRIVATE}
)
# Where each stream keeps text beside its pictures: MPEG-2 user data (start code B2), H.264 and HEVC SEI messages
# (user data unregistered), a JPEG XL container's Exif box.
STREAMS = {
    "mpeg2": b"\0\0\1\xb3\x16\x00\xf0\x13" + b"\0\0\1\xb2" + NAME + b"\0\0\1\x00\x00\x0f\xff\xf8",
    "h264": b"\0\0\0\1\x67\x64\x00\x29" + b"\0\0\0\1\x06\x05\x26" + bytes(16) + NAME + b"\x80" + b"\0\0\0\1\x65\x88\x84",
    "hevc": b"\0\0\0\1\x40\x01\x0c\x01" + b"\0\0\0\1\x4e\x01\x05\x26" + bytes(16) + NAME + b"\x80" + b"\0\0\0\1\x26\x01\xaf",
    "jxl": b"\0\0\0\x0cJXL \r\n\x87\n\0\0\0\x14ftypjxl \0\0\0\0jxl "
    + (12 + len(NAME)).to_bytes(4, "big")
    + b"Exif\0\0\0\0"
    + NAME
    + b"\0\0\0\x0ejxlc\xff\x0a\x7f\x00\x10\x11",
}
END_OF_IMAGE = b"\xff\xd9"


def _stream(syntax: str) -> bytes:
    if syntax in JPEG_XL:
        return STREAMS["jxl"]
    if syntax.startswith(("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101")):
        return STREAMS["mpeg2"]
    if syntax.startswith(tuple(f"1.2.840.10008.1.2.4.{n}" for n in range(102, 107))):
        return STREAMS["h264"]
    if syntax.startswith(("1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108")):
        return STREAMS["hevc"]
    return bytes(8) + NAME


def _file(syntax: str, frame: bytes, patient: str) -> bytes:
    """pydicom's CT_small with `frame` encapsulated as its one frame under `syntax`, ready to pool otherwise."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.BurnedInAnnotation = patient, "NO"
    writable = UID(syntax).is_transfer_syntax and not UID(syntax).is_private
    stand_in = "1.2.840.10008.1.2.4.100"  # pydicom encapsulates under no syntax it does not know: one as long, replaced
    ds.file_meta.TransferSyntaxUID = syntax if writable else stand_in
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    if writable:
        return buffer.getvalue()
    assert len(syntax) == len(stand_in) and buffer.getvalue().count(stand_in.encode()) == 1
    return buffer.getvalue().replace(stand_in.encode(), syntax.encode())


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ingested(tmp_path: Path, files: dict[str, bytes], verify: bool):
    site = tmp_path / "site"
    site.mkdir()
    for name, data in files.items():
        (site / name).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on syntaxes it has no decoder for
        summary = ingest_site("a", site, tmp_path / "pool", key=KEY, progress=False, verify_pixels=verify)
    quarantine = tmp_path / "pool-quarantine" / "a" / "quarantine.csv"
    rows = {Path(r["source"]).name: r for r in _csv(quarantine)} if quarantine.exists() else {}
    return summary, rows, sorted((tmp_path / "pool" / "a").rglob("*.dcm"))


def _unwalked_site() -> dict[str, bytes]:
    """Each unwalked syntax twice: a stream ending in FFD9 by chance, which the structural check took for a complete
    JPEG frame, and one ending otherwise."""
    files = {}
    for index, syntax in enumerate(UNWALKED):
        stream = _stream(syntax) + syntax.encode()  # no two files share pixel data
        files[f"{syntax}-ffd9.dcm"] = _file(syntax, stream + END_OF_IMAGE, f"MRN-{index}-a")
        files[f"{syntax}.dcm"] = _file(syntax, stream + b"\0\0\1\xb7", f"MRN-{index}-b")
    return files


def test_the_syntaxes_cover_the_video_and_jpeg_xl_ones():
    for syntax in ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.107", *JPEG_XL):
        assert syntax in UNWALKED
    assert not {RLE, ENCAPSULATED_UNCOMPRESSED, DeflatedExplicitVRLittleEndian} & set(UNWALKED)


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify"])
def test_a_stream_that_is_not_walked_is_quarantined_as_unwalked_compression(tmp_path, verify):
    """Before, a frame ending in FFD9 was pooled with the name in its stream (the structural check looks for a JPEG
    end-of-image marker only), one ending otherwise was quarantined as truncated, and --verify-pixels said
    undecodable_pixels: neither says what is wrong or what to do."""
    files = _unwalked_site()
    summary, rows, pooled = _ingested(tmp_path, files, verify)
    assert summary.pooled == 0 and not pooled, summary.line()
    assert {name: row["reason"] for name, row in rows.items()} == dict.fromkeys(files, "unwalked_compression")
    for name, row in rows.items():
        syntax = name.removesuffix(".dcm").removesuffix("-ffd9")
        assert syntax in row["detail"] and "JPEG 2000" in row["detail"] and "before ingest" in row["detail"], row
    assert summary.quarantined == {"unwalked_compression": len(files)}


def test_the_detail_names_what_the_stream_can_carry():
    details = {
        syntax: screen(pydicom.dcmread(io.BytesIO(_file(syntax, _stream(syntax), "MRN-1")))).detail
        for syntax in ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.107", JPEG_XL[0])
    }
    assert "MPEG-2" in details["1.2.840.10008.1.2.4.100"] and "user data" in details["1.2.840.10008.1.2.4.100"]
    assert "H.264" in details["1.2.840.10008.1.2.4.102"] and "SEI" in details["1.2.840.10008.1.2.4.102"]
    assert "HEVC" in details["1.2.840.10008.1.2.4.107"] and "SEI" in details["1.2.840.10008.1.2.4.107"]
    assert "JPEG XL" in details[JPEG_XL[0]] and "Exif" in details[JPEG_XL[0]]


def test_deidentify_itself_refuses_a_stream_it_does_not_walk():
    """Any caller, not only ingest (which screens first): a de-identified file must not keep text in its stream."""
    ds = pydicom.dcmread(io.BytesIO(_file("1.2.840.10008.1.2.4.102", _stream("1.2.840.10008.1.2.4.102"), "MRN-1")))
    with pytest.raises(InputError, match="H.264"):
        deidentify(ds, KEY)
    assert NAME in ds.PixelData  # left as it was: nothing half-done


def test_a_file_without_pixel_data_is_left_to_the_pixel_checks():
    ds = pydicom.dcmread(io.BytesIO(_file("1.2.840.10008.1.2.4.102", _stream("1.2.840.10008.1.2.4.102"), "MRN-1")))
    del ds.PixelData
    assert screen(ds) is None  # no stream to carry text; ingest's pixel checks name what is missing


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify"])
def test_rle_and_deflated_files_are_still_pooled_without_the_name(tmp_path, verify):
    """RLE segments hold samples only; a deflated data set is inflated before de-identification, so the planted name
    in its header is replaced like any other."""
    rle = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    rle.PatientName, rle.PatientID, rle.BurnedInAnnotation = NAME.decode(), "MRN-RLE", "NO"
    deflated = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    deflated.PatientName, deflated.PatientID, deflated.BurnedInAnnotation = NAME.decode(), "MRN-DEFLATED", "NO"
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    files = {}
    for name, ds in (("rle.dcm", rle), ("deflated.dcm", deflated)):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files[name] = buffer.getvalue()
    summary, rows, pooled = _ingested(tmp_path, files, verify)
    assert summary.pooled == 2 and not rows, summary.line()
    syntaxes = set()
    for path in pooled:
        ds = pydicom.dcmread(path)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert NAME not in path.read_bytes(), path.name
        if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:  # search the bytes as inflated too
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            assert NAME not in buffer.getvalue()
    assert syntaxes == {RLE, DeflatedExplicitVRLittleEndian}
