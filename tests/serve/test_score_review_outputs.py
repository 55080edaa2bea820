"""`medtriage score`'s output folders and SRs: a folder that cannot be written in stops the run before any scoring, an
SR says when its score was made despite a failed safety check and quotes no patient name in a warning, and no output
name starts with a dash."""

import errno
import json
import os
import pathlib
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main
from tests.serve.test_dicom_outputs_validate import validation_errors
from tests.serve.test_scope import CHEST_XRAY_SCOPE, with_meta

CT = get_testdata_file("CT_small.dcm")


def score(capsys, *args) -> tuple[int, str, str]:
    code = main(["score", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("option", ["--sr", "--overlays", "--heatmaps"])
def test_an_output_folder_that_cannot_be_written_in_stops_before_any_scoring(capsys, package_dir, tmp_path, monkeypatch, option):
    """Before, only a folder that could not be made was refused up front: an existing read-only one (a mounted
    share, another user's folder) let every file be decoded and scored, then each one's output failed."""
    folder = tmp_path / "out"
    folder.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # the kernel's answer in a folder this user may not write in
        if flags & os.O_CREAT and pathlib.Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, out, err = score(capsys, package_dir, CT, option, folder)
    assert code == 2 and out == "" and "input(s)" not in err
    assert f"{option} {folder}: cannot write in the output folder (Permission denied)" in err
    assert list(folder.iterdir()) == []


def test_an_sr_quotes_no_patient_name_in_a_warning(capsys, package_dir, tmp_path):
    """Before, highdicom warned of every one-part Patient's Name (a pseudonym) it copied into an SR, quoting the name:
    patient data on stderr, or in a DICOM node's journal, once per file."""
    source = tmp_path / "ct.dcm"
    ds = pydicom.dcmread(CT)
    ds.PatientName = "PSEUDO0042"
    ds.save_as(source)
    sr_dir = tmp_path / "sr"
    with warnings.catch_warnings(record=True) as caught:
        code, _, err = score(capsys, package_dir, source, "--sr", sr_dir)
    assert code == 0 and "PSEUDO0042" not in err
    assert [str(w.message) for w in caught if "PSEUDO0042" in str(w.message)] == []
    (sr,) = sr_dir.glob("*.SR.dcm")
    assert pydicom.dcmread(sr).PatientName == "PSEUDO0042"  # carried as the source has it


@pytest.mark.parametrize("uid", ["--help", "-rf", " -x"])
def test_no_output_name_starts_with_a_dash(capsys, package_dir, tmp_path, uid):
    """A crafted SOP Instance UID named the SR file "--help.<digest>.SR.dcm": `storescu ... *` or `tar cf x *` in the
    folder then took it for an option and stopped, sending none of the SRs."""
    source = tmp_path / "ct.dcm"
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = uid
    ds.save_as(source)
    sr_dir, overlays = tmp_path / "sr", tmp_path / "overlays"
    code, _, _ = score(capsys, package_dir, source, "--sr", sr_dir, "--overlays", overlays)
    written = [p.name for p in [*sr_dir.iterdir(), *overlays.iterdir()]]
    assert code == 0 and len(written) == 2
    assert not [name for name in written if name.startswith("-")]


def caveats(sr: pydicom.Dataset) -> list[str]:
    """The meanings of the SR's "Scored despite a failed safety check" items, at any depth of its content tree."""
    found = []
    for item in sr.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == "caveat":
            found.append(item.ConceptCodeSequence[0].CodeMeaning)
        found += caveats(item)
    return found


def test_an_sr_says_when_its_score_was_made_despite_a_failed_safety_check(capsys, safe_package_dir, package_dir, tmp_path, need_tool):
    """Before, `--allow-out-of-scope` marked the score in the table, the JSON and the CSV, but its SR (the only result
    a PACS shows) read like any other: a CT scored by a chest X-ray model stood in the study as a routine triage."""
    chest = with_meta(safe_package_dir, tmp_path / "chest", scope=CHEST_XRAY_SCOPE)
    code, out, _ = score(capsys, chest, CT, "--allow-out-of-scope", "--sr", tmp_path / "sr", "--json")
    (result,) = json.loads(out)["results"]
    (flagged,) = (tmp_path / "sr").glob("*.SR.dcm")
    assert code == 0 and result["flags"][0] == "out_of_scope:modality"
    assert caveats(pydicom.dcmread(flagged))[:1] == ["Outside the model's scope (modality)"]
    assert validation_errors(need_tool("dciodvfy", "apt-get install dicom3tools"), flagged) == []
    assert score(capsys, package_dir, CT, "--sr", tmp_path / "plain")[0] == 0  # a package without a scope: no flag
    (plain,) = (tmp_path / "plain").glob("*.SR.dcm")
    assert caveats(pydicom.dcmread(plain)) == []
