"""A source whose header holds a value pydicom cannot read (an element whose VR bytes were overwritten, here with the
unknown "AH"), yet whose image scores: a value the SR copies costs that value, not the SR; one the builders meet
elsewhere costs the SR, refused with what an SR needs and what to do, by `score --sr` and /v1/sr alike."""

from __future__ import annotations

import json
import struct

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.serve.http import create_app
from tests.serve.test_http_edges import LiveServer

TOKEN = "unreadable-token-5c2a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CT = get_testdata_file("CT_small.dcm")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of the VR it does not know


def unreadable(folder, keyword: str):
    """CT_small (explicit VR little endian) written to `folder` with `keyword`'s VR bytes overwritten with "AH"."""
    element = pydicom.dcmread(CT)[keyword]
    head = struct.pack("<HH", element.tag.group, element.tag.element) + element.VR.encode()
    data = open(CT, "rb").read()
    assert data.count(head) == 1
    path = folder / f"unreadable-{keyword}.dcm"
    path.write_bytes(data.replace(head, head[:4] + b"AH"))
    return path


@pytest.mark.parametrize("keyword", ["PatientName", "StudyDate", "StudyID"])
def test_an_unreadable_value_the_sr_copies_is_left_empty(capsys, package_dir, tmp_path, keyword):
    """The copied values were read outside the builders' guard: the run ended in a NotImplementedError traceback, and
    with it every other file's results."""
    path = unreadable(tmp_path, keyword)
    code = main(["score", str(package_dir), str(path), "--sr", str(tmp_path / "sr"), "--json"])
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.err
    assert [r["file"] for r in json.loads(out.out)["results"]] == [str(path)]
    (written,) = (tmp_path / "sr").glob("*.SR.dcm")
    sr = pydicom.dcmread(written)
    assert sr[keyword].value == "" and sr.PatientID == pydicom.dcmread(CT).PatientID  # filed with its patient still


def test_v1_sr_refusing_an_unreadable_value_says_what_an_sr_needs_and_what_to_do(predictor, tmp_path):
    """A value the builders read themselves (Patient's Age) refuses the SR; the hint said the source might lack
    study/patient attributes, which are copied empty where missing and so never stop an SR."""
    files = [("files", ("age.dcm", unreadable(tmp_path, "PatientAge").read_bytes(), "application/dicom"))]
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        refused = client.post("/v1/sr", files=files, headers=AUTH)
    assert refused.status_code == 422, refused.text[:300]
    error = refused.json()["error"]
    assert (error["file"], error["type"]) == ("age.dcm", "DicomError")
    assert "(0010,1010)" in error["reason"] and "study/patient" not in error["hint"]
    assert "Study, Series and SOP Instance UIDs and SOP Class UID" in error["hint"]
    assert "export the image again" in error["hint"] and "/v1/score" in error["hint"]
