"""Deflated data sets within the decode limits, read as they inflate: the SR builder's header read inflates the
header only, scoring holds the data set once (as it would the same file uncompressed), and a deflated file decodes,
scores and is referenced exactly as the same image uncompressed. Peaks are of real processes (RSS)."""

from __future__ import annotations

import dataclasses
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from medtriage.errors import DicomError
from medtriage.io.dicom import read_dicom
from medtriage.serve.dicom_results import SR_HEADER_READ_BYTES, read_header, sr_bytes
from tests.io.test_deflate_bombs import deflate_bomb
from tests.memory import outcome_and_peak_bytes

MiB = 1 << 20
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
_RAMP = struct.pack("<256H", *range(0, 4096, 16))  # 12-bit stored values
_BLOCK = 16 * MiB  # inflated bytes per repeated deflate block
# Runs the code in argv[1] (argv[2:] its arguments) as its child and prints the child's exit status and peak resident
# memory (KiB): a child started by pytest itself would count pytest's memory at the start as its own.
_MEASURED = """import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]])
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _peak_rss(code: str, *args: str) -> int:
    """Peak resident memory, in bytes, of a fresh process that runs `code` with `args` as its sys.argv[1:]."""
    run = subprocess.run([sys.executable, "-c", _MEASURED, code, *args], capture_output=True, text=True, timeout=300, check=True)
    status, kib = run.stdout.split()[-2:]
    assert status == "0", run.stderr[-3000:]
    return int(kib) * 1024


def _explicit_little(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def large_image(path: Path, rows: int, columns: int, frames: int = 1, *, deflated: bool = True) -> Path:
    """A 16-bit DX image of a repeated ramp, deflated or not, written as it is made: never held whole, nor inflated."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_STORAGE, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = generate_uid(), generate_uid(), "P1", "DX"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    size = rows * columns * frames * 2
    head = _explicit_little(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, size)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        out.write(deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH) if deflated else head)
        for start in range(0, size, _BLOCK):
            out.write(_ramp_block(min(_BLOCK, size - start), deflated))
        out.write(deflate.flush() if deflated else b"")
    return path


def _ramp_block(size: int, deflated: bool) -> bytes:
    """`size` bytes of the ramp; deflated, a block that stands alone (a full flush), so that blocks can be repeated."""
    data = _RAMP * (size // len(_RAMP))
    if not deflated:
        return data
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflate.compress(data) + deflate.flush(zlib.Z_FULL_FLUSH)


def test_the_sr_header_of_a_deflated_file_is_read_without_inflating_its_pixels(tmp_path):
    """pydicom inflated the whole data set (384 MiB of pixels) and held it twice to read the header before them."""
    path = large_image(tmp_path / "large.dcm", 8192, 8192, 3)
    assert path.stat().st_size < 4 * MiB
    imports = _peak_rss("import medtriage.serve.dicom_results")
    read = "import sys; from medtriage.serve.dicom_results import read_header; h = read_header(sys.argv[1]); assert h.Rows == 8192"
    assert _peak_rss(read + " and h.NumberOfFrames == 3 and 'PixelData' not in h", str(path)) - imports < 64 * MiB


def test_scoring_holds_a_deflated_file_once_as_it_would_the_same_file_uncompressed(tmp_path):
    """pydicom held the inflated data set beside the elements read from it, and its decoder copied the pixels again."""
    deflated = large_image(tmp_path / "deflated.dcm", 4096, 8192)
    plain = large_image(tmp_path / "plain.dcm", 4096, 8192, deflated=False)  # 64 MiB of pixels, 128 MiB decoded
    read = "import sys; from medtriage.io.dicom import read_dicom; assert read_dicom(sys.argv[1]).pixels.shape == (1, 1, 4096, 8192)"
    assert _peak_rss(read, str(deflated)) < _peak_rss(read, str(plain)) + 32 * MiB


def _as(path: str, syntax: str) -> bytes:
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)  # deflated by pydicom where the syntax says so
    return out.getvalue()


@pytest.mark.parametrize("name", ["CT_small.dcm", "emri_small.dcm"])  # signed with a rescale; 10 frames
def test_a_deflated_file_decodes_scores_and_is_referenced_as_the_same_image_uncompressed(predictor, name):
    path = get_testdata_file(name)
    deflated, plain = _as(path, DeflatedExplicitVRLittleEndian), _as(path, ExplicitVRLittleEndian)
    assert len(deflated) < len(plain)
    image, expected = read_dicom(deflated), read_dicom(plain)
    assert image.transfer_syntax == DeflatedExplicitVRLittleEndian and expected.transfer_syntax == ExplicitVRLittleEndian
    np.testing.assert_array_equal(image.pixels, expected.pixels)
    np.testing.assert_array_equal(image.frame_means, expected.frame_means)
    others = [field.name for field in dataclasses.fields(image) if field.name not in ("pixels", "frame_means", "transfer_syntax")]
    assert {key: getattr(image, key) for key in others} == {key: getattr(expected, key) for key in others}
    scores, expected_scores = predictor.score_file(deflated, name="a.dcm"), predictor.score_file(plain, name="a.dcm")
    assert [score.as_dict() for score in scores] == [score.as_dict() for score in expected_scores]
    header = read_header(deflated)
    assert header == read_header(plain) and header.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    sr = pydicom.dcmread(io.BytesIO(sr_bytes(deflated, scores, predictor.package)))
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image.sop_uid


def test_the_sr_header_read_bound_holds_for_a_deflated_file(tmp_path):
    """The bound on what the header before the pixels may hold was applied to the deflated bytes, which pydicom read
    whole past it: 64 MiB of private data before the pixels were inflated and read, as they are not from a file that
    is not deflated."""
    path = tmp_path / "bulk-before-pixels.dcm"
    path.write_bytes(deflate_bomb(64 * MiB))
    refused, peak = outcome_and_peak_bytes(lambda: read_header(path))
    assert isinstance(refused, DicomError) and f"over {SR_HEADER_READ_BYTES} bytes" in refused.reason, refused
    assert peak < 8 * MiB
