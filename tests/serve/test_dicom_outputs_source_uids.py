"""A source without a UID an SR references it by (removed or emptied by a de-identifier or converter): it still
scores, and its SR is refused naming the attribute by keyword and tag, the file, and what to do, by `score --sr` and
by /v1/sr alike."""

from __future__ import annotations

import csv
import io
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
    document = json.loads(out.out)
    (unwritten,) = document["not_written"]
    assert code == 1 and "Traceback" not in out.err and document["rejected"] == []
    assert [r["file"] for r in document["results"]] == [str(path)]  # scored: the SR needs the UID, the score does not
    assert (unwritten["file"], unwritten["output"], unwritten["error"]) == (str(path), "SR", "DicomError")
    assert f"{keyword} {tag}" in unwritten["reason"] and "AttributeError" not in unwritten["reason"]
    assert unwritten["reason"].startswith("no SR written: ")
    assert "export the image again" in unwritten["hint"]  # what to do, as the error says it
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


def test_score_sr_keeps_the_score_of_a_file_whose_sr_is_refused_in_every_form(capsys, package_dir, tmp_path):
    """The file scored, so its score is listed as scored in the table, --json and --csv alike; the SR that could not
    be built is named apart (which file, why, what to do), and the exit status says not all that was asked was done.
    It was listed among the rejected files without its score, its reason saying it had been scored."""
    ct = get_testdata_file("CT_small.dcm")
    path = _without(tmp_path, "StudyInstanceUID")
    command = ["score", str(package_dir), str(path), ct, "--sr", str(tmp_path / "sr")]

    code = main([*command, "--json"])
    out = capsys.readouterr()
    document = json.loads(out.out)
    assert code == 1 and document["rejected"] == [] and "Traceback" not in out.err
    assert [(r["file"], r["status"]) for r in document["results"]] == [(str(path), "scored"), (ct, "scored")]
    (unwritten,) = document["not_written"]
    assert (unwritten["file"], unwritten["output"], unwritten["error"]) == (str(path), "SR", "DicomError")
    assert unwritten["reason"].startswith("no SR written: ") and "StudyInstanceUID (0020,000D)" in unwritten["reason"]
    assert "export the image again" in unwritten["hint"]
    assert "2 file(s) scored (2 image(s)), 0 rejected, 1 SR(s) not written" in out.err
    assert len(list((tmp_path / "sr").glob("*.SR.dcm"))) == 1  # the CT's

    assert main(command) == 1
    table, _, section = capsys.readouterr().out.partition("\n\n")
    assert "REJECTED" not in table and table.splitlines()[1].startswith(f"{path.name}  ")
    assert str(document["results"][0]["probability"])[:3] in table.splitlines()[1]
    heading, line = section.splitlines()
    assert heading.startswith("not written") and line.startswith(f"{path.name}: {unwritten['reason']} ({unwritten['hint']})")

    assert main([*command, "--csv"]) == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["status"], row["file"]) for row in rows] == [("scored", str(path)), ("scored", ct), ("not_written", str(path))]
    assert (rows[2]["reason"], rows[2]["hint"]) == (unwritten["reason"], unwritten["hint"])
