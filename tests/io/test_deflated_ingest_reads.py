"""Ingest reads a deflated file as it inflates (io.clamped.read_part10), where pydicom inflated it whole and copied its
elements out of that (twice its inflated size): the same data set is pooled as from the file uncompressed, and a
deflated data set past the ingest limit (--max-file-bytes) or the decode limits is refused as before, with the same
words and hint."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medtriage.errors import ImageTooLargeError
from medtriage.io import ingest_file
from medtriage.io.clamped import dicom_source
from medtriage.io.deid import DeidOptions
from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_file import init_worker, process_file
from medtriage.io.site_key import SiteKey
from tests.io.test_deflate_bombs import deflate_bomb
from tests.memory import peak_bytes

KEY = SiteKey(b"deflated-ingest-key-0123456789ab")
MiB = 1 << 20
META_KEPT_APART = (0x00020000, 0x00020010)  # the file meta's group length and transfer syntax: what the syntax changes


def _phi_image(syntax: str) -> bytes:
    """pydicom's CT_small (a real CT slice: patient name, dates, institution...) written in `syntax`."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ReferringPhysicianName, ds.InstitutionAddress, ds.AccessionNumber = "HIBBERT^JULIUS", "1 Hospital Road", "ACC-1"
    ds.add_new(0x00091010, "LO", "private note naming DOE^JANE")  # a private element de-identification removes
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _ingested(tmp_path: Path, name: str, data: bytes) -> pydicom.Dataset:
    site, pool = tmp_path / f"site-{name}", tmp_path / f"pool-{name}"
    site.mkdir()
    (site / "image.dcm").write_bytes(data)
    summary = ingest_site("a", site, pool, key=KEY, progress=False)
    assert summary.pooled_new == 1 and not summary.quarantined, summary
    [pooled] = (pool / "a").rglob("*.dcm")
    return pydicom.dcmread(pooled)


def test_a_deflated_file_is_pooled_as_the_same_data_set_uncompressed_is(tmp_path):
    deflated = _phi_image(DeflatedExplicitVRLittleEndian)
    plain = _phi_image(ExplicitVRLittleEndian)
    assert zlib.crc32(deflated) != zlib.crc32(plain)
    from_deflated, from_plain = _ingested(tmp_path, "deflated", deflated), _ingested(tmp_path, "plain", plain)
    # ingest writes the de-identified data set in the syntax it came in: a deflated input stays deflated
    assert from_deflated.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert from_plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert from_deflated.PixelData == from_plain.PixelData
    assert from_deflated == from_plain  # every element of the de-identified data set, sequences included
    assert "PatientName" not in from_deflated or "DOE" not in str(from_deflated.PatientName)
    assert 0x00091010 not in from_deflated and "InstitutionAddress" not in from_deflated
    for tag in META_KEPT_APART:
        del from_deflated.file_meta[tag], from_plain.file_meta[tag]
    assert from_deflated.file_meta == from_plain.file_meta


def _worker(max_file_bytes: int = ingest_file.DEFAULT_MAX_FILE_BYTES) -> None:
    init_worker(KEY, DeidOptions(), frozenset(), False, max_file_bytes)


def test_a_deflated_file_is_screened_and_de_identified_as_the_same_file_uncompressed(tmp_path):
    _worker()
    outcomes = []
    for name, syntax in (("deflated", DeflatedExplicitVRLittleEndian), ("plain", ExplicitVRLittleEndian)):
        (tmp_path / f"{name}.dcm").write_bytes(_phi_image(syntax))
        outcomes.append(process_file(str(tmp_path / f"{name}.dcm")))
    deflated, plain = outcomes
    assert deflated.status == plain.status == "pending", (deflated.reason, deflated.detail)
    fields = ("pixel_sha256", "sop_uid", "study_uid", "series_uid", "patient", "accession", "modality", "identified_by_name")
    assert [getattr(deflated, f) for f in fields] == [getattr(plain, f) for f in fields]


def _zeros(size: int) -> bytes:
    """`size` zero bytes deflated as stand-alone blocks, one repeated: never held inflated here."""
    step = 16 * MiB

    def block(n: int) -> bytes:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflate.compress(bytes(n)) + deflate.flush(zlib.Z_FULL_FLUSH)

    whole, rest = divmod(size, step)
    return block(step) * whole + (block(rest) if rest else b"")


def deflated_image(rows: int, columns: int, accession: str = "A1") -> bytes:
    """A deflated 16-bit CR image of `rows` x `columns` black pixels: a file of kilobytes whatever it inflates to."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.826.0.1.3680043.8.498.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
    ds.PatientID, ds.PatientName, ds.Modality, ds.AccessionNumber = "P1", "DOE^JANE", "CR", accession
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    head = pydicom.filebase.DicomBytesIO()
    head.is_implicit_VR, head.is_little_endian = False, True
    pydicom.filewriter.write_dataset(head, ds)
    pixels = rows * columns * 2
    outer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels)
    body = outer.compress(head.getvalue() + element) + outer.flush(zlib.Z_FULL_FLUSH) + _zeros(pixels) + outer.flush()
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + body


def test_a_deflated_file_is_held_once_as_it_is_read():
    """pydicom inflated the data set whole, then copied each element out of it: 128 MiB of pixels cost over 256 MiB."""
    data = deflated_image(8192, 8192)
    assert len(data) < MiB
    pixels = 8192 * 8192 * 2

    def read():
        ds = ingest_file._read_dataset(data, "big.dcm", 1 << 30)
        assert len(ds.PixelData) == pixels and ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian

    assert peak_bytes(read) < pixels + 24 * MiB


def _refusal_before(data: bytes, source: str, allowed: int, hint: str) -> str:
    """What ingest quarantined the file with before it read deflated data sets as they inflate: dicom_source's count."""
    with pytest.raises(ImageTooLargeError) as refused, dicom_source(data, source, inflated_allowed=allowed, inflated_hint=hint):
        pass
    return str(refused.value)


@pytest.mark.parametrize("undefined_length", [False, True], ids=["bulk", "bulk_to_a_delimiter"])
def test_a_deflated_file_past_the_ingest_limit_is_refused_as_before(tmp_path, undefined_length):
    limit = 4 * MiB
    path = tmp_path / "bomb.dcm"
    path.write_bytes(deflate_bomb(64 * MiB, undefined_length=undefined_length))
    assert path.stat().st_size < limit
    _worker(limit)
    out = _peak_and(lambda: process_file(str(path)), limit)
    hint = "the ingest limit (--max-file-bytes) applies to the data set once inflated: raise it if the file is genuine"
    assert (out.status, out.reason) == ("quarantined", "too_large")
    assert out.detail == _refusal_before(path.read_bytes(), str(path), limit, hint)
    assert f"inflates to more than {limit} bytes" in out.detail and "--max-file-bytes" in out.detail


def test_a_deflated_file_past_the_decode_limits_is_refused_as_before(tmp_path, small_decode_limits):
    """The ingest limit above the decode limits: what the pool builder could not decode is refused, with its own hint."""
    path = tmp_path / "image.dcm"
    path.write_bytes(deflated_image(8192, 8192))  # 128 MiB of pixels
    _worker()  # the default ingest limit, 1 GiB
    out = _peak_and(lambda: process_file(str(path)), small_decode_limits)
    hint = "more than any image the pool builder decodes (within its decode limits) holds; check the file at the source"
    assert (out.status, out.reason) == ("quarantined", "too_large")
    assert out.detail == _refusal_before(path.read_bytes(), str(path), small_decode_limits, hint)


def test_a_deflated_file_inflating_to_the_decode_limits_is_pooled_and_past_them_is_not(tmp_path, small_decode_limits):
    for inflated, status in ((small_decode_limits, "pending"), (small_decode_limits + 2, "quarantined")):
        path = tmp_path / f"{inflated}.dcm"
        path.write_bytes(deflate_bomb(inflated))
        _worker()
        assert process_file(str(path)).status == status


def _peak_and(action, bound: int):
    """`action()`, checking that it held no more than `bound` bytes at a time: the bound a data set may inflate to,
    and a few MiB of inflating, never the whole data set."""
    result = []
    peak = peak_bytes(lambda: result.append(action()))
    assert peak < bound + 8 * MiB, f"peaked at {peak >> 20} MiB"
    return result[0]


@pytest.mark.parametrize("cut", [1, 4, 200], ids=["last_byte", "last_bytes", "inside_the_pixels"])
def test_a_deflated_file_cut_short_is_quarantined_never_pooled(tmp_path, cut):
    """Read as it inflates, a deflate stream that stopped early ended the data set where it stopped: a file missing
    only its stream's last bytes was pooled, as if whole (pydicom's whole inflate refused it)."""
    data = _phi_image(DeflatedExplicitVRLittleEndian)[:-cut]
    site, pool = tmp_path / "site", tmp_path / "pool"
    site.mkdir()
    (site / "image.dcm").write_bytes(data)
    summary = ingest_site("a", site, pool, key=KEY, progress=False)
    assert summary.pooled_new == 0 and sum(summary.quarantined.values()) == 1, summary
    assert not list(pool.rglob("*.dcm"))
