"""Deflate bombs: a Deflated Explicit VR Little Endian file of a few hundred KB whose data set inflates to hundreds of
MB. Each reader bounds what it inflates by its own limit before anything is inflated whole, measured as the peak
memory of a real process. Shared with tests/serve/test_deflate_bombs.py (score, serve, the DICOM node)."""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from medtriage.io.ingest import ingest_site
from medtriage.io.site_key import SiteKey

BOMB_BYTES = 768 << 20  # inflated: a reader that inflates it whole peaks at over twice this
PEAK_BOUND = 512 << 20  # a process that never holds the bomb inflated stays well under this
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_ZEROS = 16 << 20  # inflated bytes per repeated deflate block
# Runs `medtriage ARGS` as its child and writes that child's peak resident memory (KiB) to a file: a child forked from
# pytest itself would count pytest's memory at the fork as its own.
_MEASURED = """import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import sys; from medtriage.cli import main; sys.exit(main(sys.argv[1:]))", *sys.argv[2:]])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(child.returncode)
"""


def _explicit_little(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def deflate_bomb(inflated: int, bulk_group: int = 0x0029, undefined_length: bool = False, side: int = 8) -> bytes:
    """A valid CR image, deflated, whose data set holds a private OB element of zeros that brings it to `inflated`
    bytes. The element sits in `bulk_group` (0x0029: after the identifying elements; 0x0009: among them); of
    `undefined_length`, it ends at a delimiter that a reader must read up to. Built from one deflate block of zeros
    repeated (a full flush makes each block stand alone), so the bomb is never held inflated here."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR_STORAGE, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.BodyPartExamined = "P1", "DOE^JANE", "CR", "CHEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", side, side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.add_new(bulk_group << 16 | 0x0010, "LO", "BOMB")  # the private block's creator
    ds.add_new(0x7FE00010, "OB", bytes(range(side * side)))
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag.group <= bulk_group else after).add(elem)
    head, tail = _explicit_little(before), _explicit_little(after)
    delimiter = b"\xfe\xff\xdd\xe0\0\0\0\0" if undefined_length else b""
    bulk = inflated - len(head) - 12 - len(delimiter) - len(tail)
    bulk -= bulk % 2
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    outer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    length = 0xFFFFFFFF if undefined_length else bulk
    out.write(outer.compress(head + struct.pack("<HH2sHL", bulk_group, 0x1010, b"OB", 0, length)) + outer.flush(zlib.Z_FULL_FLUSH))
    whole, rest = divmod(bulk, _ZEROS)
    out.write(_zeros_block(_ZEROS) * whole + _zeros_block(rest))
    out.write(outer.compress(delimiter + tail) + outer.flush())
    return out.getvalue()


def _zeros_block(size: int) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflate.compress(bytes(size)) + deflate.flush(zlib.Z_FULL_FLUSH)


def measured_run(args: list[str], env: dict | None = None, timeout: float = 300) -> tuple[int, str, int]:
    """`medtriage ARGS` in a child process: its exit status, output, and peak resident memory in bytes (its own or
    that of a process it started and waited for, whichever is larger)."""
    with tempfile.TemporaryDirectory() as folder:
        peak = Path(folder) / "peak"
        run = subprocess.run(
            [sys.executable, "-c", _MEASURED, str(peak), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
            check=False,
        )
        return run.returncode, run.stdout.decode(errors="replace"), int(peak.read_text()) * 1024


def test_the_bomb_is_small_and_inflates_to_a_valid_image(tmp_path):
    data = deflate_bomb(1 << 20)
    assert len(data) < 4096
    path = tmp_path / "small.dcm"
    path.write_bytes(data)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian and ds.PatientID == "P1" and ds.Rows == 8
    assert len(_explicit_little(ds)) == (1 << 20)
    assert len(deflate_bomb(BOMB_BYTES)) < BOMB_BYTES // 500


def _quarantine_rows(pool: Path) -> list[dict]:
    with open(pool.parent / f"{pool.name}-quarantine" / "a" / "quarantine.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_ingest_bounds_an_inflated_data_set_by_its_file_size_limit(tmp_path):
    """--max-file-bytes bounded only the bytes on disk: a 1 MB file under a 16 MiB limit was inflated to 768 MiB in
    the worker (and pooled). Its data set is held inflated, so the limit bounds it inflated too."""
    site, pool = tmp_path / "site", tmp_path / "pool"
    site.mkdir()
    (site / "bomb.dcm").write_bytes(deflate_bomb(BOMB_BYTES))
    limit = 16 << 20
    assert (site / "bomb.dcm").stat().st_size < limit
    env = {**os.environ, "MEDTRIAGE_SITE_SECRET": "e" * 64}
    status, output, peak = measured_run(["ingest", str(site), "--site", "a", "--into", str(pool), "--max-file-bytes", str(limit)], env)
    assert status == 0, output
    assert "pooled 0" in output and "too_large 1" in output, output
    [row] = _quarantine_rows(pool)
    assert row["reason"] == "too_large"
    assert f"inflates to more than {limit} bytes" in row["detail"] and "--max-file-bytes" in row["detail"], row
    assert peak < PEAK_BOUND, f"ingest peaked at {peak >> 20} MiB"


def test_a_deflated_file_inflating_to_the_ingest_limit_is_pooled_and_one_byte_more_is_not(tmp_path):
    key = SiteKey(b"k" * 32)
    size = 1 << 20
    for limit, pooled in ((size, 1), (size - 1, 0)):
        site = tmp_path / f"site-{limit}"
        site.mkdir()
        (site / "image.dcm").write_bytes(deflate_bomb(size))
        summary = ingest_site("a", site, tmp_path / f"pool-{limit}", key=key, max_file_bytes=limit, progress=False)
        assert summary.pooled_new == pooled
        assert dict(summary.quarantined) == ({} if pooled else {"too_large": 1})
