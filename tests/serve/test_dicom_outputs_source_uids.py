"""A source without a UID an SR references it by (removed or emptied by a de-identifier or converter): it still
scores, and its SR is refused naming the attribute by keyword and tag, the file, and what to do, by `score --sr` and
by /v1/sr alike."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.serve.http import create_app
from tests.serve.test_http_edges import LiveServer

TOKEN = "uid-token-7e41"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UIDS = [
    ("StudyInstanceUID", "(0020,000D)"),
    ("SeriesInstanceUID", "(0020,000E)"),
    ("SOPClassUID", "(0008,0016)"),
    ("SOPInstanceUID", "(0008,0018)"),
]


def _without(folder, keyword: str, emptied: bool = False):
    """CT_small written to `folder` with `keyword` deleted, or present and empty."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if emptied:
        setattr(ds, keyword, "")
    else:
        delattr(ds, keyword)
    path = folder / f"no-{keyword}.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("emptied", [False, True], ids=["deleted", "emptied"])
@pytest.mark.parametrize(("keyword", "tag"), UIDS)
def test_score_sr_names_the_missing_uid_and_writes_no_sr(capsys, package_dir, tmp_path, keyword, tag, emptied):
    """Deleted, the builders failed on the first UID they met with an AttributeError's text; emptied, an SR was
    written that references nothing, or sits in no study."""
    path = _without(tmp_path, keyword, emptied)
    code = main(["score", str(package_dir), str(path), "--sr", str(tmp_path / "sr"), "--json"])
    out = capsys.readouterr()
    (rejected,) = json.loads(out.out)["rejected"]
    assert code == 1 and "Traceback" not in out.err
    assert (rejected["file"], rejected["error"]) == (str(path), "DicomError")
    assert f"{keyword} {tag}" in rejected["reason"] and "AttributeError" not in rejected["reason"]
    assert rejected["reason"].startswith("scored, but no SR written: ")
    assert "export the image again" in rejected["hint"]  # what to do, as the error says it
    assert not list((tmp_path / "sr").glob("*.SR.dcm"))


def test_v1_sr_names_every_missing_uid_the_file_and_what_to_do(predictor, tmp_path):
    """/v1/sr's refusal says which UIDs are missing and that the image must be exported again with them; its score
    is still given by /v1/score."""
    ds = pydicom.dcmread(_without(tmp_path, "SeriesInstanceUID"))
    del ds.SOPClassUID
    path = tmp_path / "stripped.dcm"
    ds.save_as(path)
    files = [("files", ("stripped.dcm", path.read_bytes(), "application/dicom"))]
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        refused = client.post("/v1/sr", files=files, headers=AUTH)
        scored = client.post("/v1/score", files=files, headers=AUTH)
    assert refused.status_code == 422, refused.text[:300]
    error = refused.json()["error"]
    assert (error["file"], error["type"]) == ("stripped.dcm", "DicomError")
    assert "SeriesInstanceUID (0020,000E), SOPClassUID (0008,0016)" in error["reason"]
    assert "AttributeError" not in error["reason"] and "study/patient" not in error["hint"]
    assert "export the image again" in error["hint"] and "given without an SR" in error["hint"]
    assert scored.status_code == 200 and scored.json()["results"][0]["probability"] >= 0
