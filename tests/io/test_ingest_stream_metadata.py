"""What de-identification removed from compressed frames (comments and application segments), recorded per ingest run:
counted by kind in the audit log, and the number of files it was removed from in the summary line."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.io.ingest import ingest_site
from medtriage.io.site_key import SiteKey

KEY = SiteKey(b"stream-metadata-secret-0123456789abcdef")
# pydicom's real files: Kakadu's comment in a JPEG 2000 codestream, a comment and a non-JFIF APP0 in a lossless JPEG,
# and native pixels, which hold no segments
SITE_FILES = {"JPEG2000.dcm": "MRN-1", "JPGLosslessP14SV1_1s_1f_8b.dcm": "MRN-2", "CT_small.dcm": "MRN-3"}


def _site(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, patient_id in SITE_FILES.items():
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.PatientID, ds.BurnedInAnnotation = patient_id, "NO"  # as a site that reviewed its captures exports them
        ds.save_as(folder / name, enforce_file_format=True)
    return folder


def _counts(summary) -> dict:
    return json.loads(Path(summary.log_path).read_text())["counts"]


@pytest.mark.parametrize("workers", [1, 2])
def test_ingest_records_the_metadata_removed_from_compressed_frames_per_run(tmp_path, workers):
    """Before, the counts de-identification returned were dropped: neither the audit log nor the summary said that a
    site's compressed files carried text beside their pixels."""
    site, pool = _site(tmp_path / "site"), tmp_path / "pool"
    first = ingest_site("a", site, pool, key=KEY, workers=workers, progress=False)
    assert first.pooled_new == 3, first.line()
    assert _counts(first)["stream_metadata_removed"] == {"COM": 2, "APP0": 1}
    assert _counts(first)["stream_metadata_files"] == 2
    assert first.line().endswith("; metadata removed from 2 compressed file(s)")
    again = ingest_site("a", site, pool, key=KEY, progress=False)  # nothing new: this run removed nothing
    assert again.pooled_before == 3 and _counts(again)["stream_metadata_removed"] == {}
    assert "metadata removed" not in again.line()
