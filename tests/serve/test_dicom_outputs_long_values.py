"""The SR and the heatmap for sources and packages whose text outgrows DICOM's value limits, checked by dicom3tools'
dciodvfy: a label longer than a Code Meaning (LO, 64 characters) or a Code Value (SH, 16), a source header whose
Patient ID, Accession Number, Study ID or referring physician's name is longer than its VR allows, and a package named
in letters the source's character set lacks."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.serve.dicom_results import encoded, sr_bytes
from medtriage.serve.node.heatmap import secondary_capture
from medtriage.serve.package import ModelPackage
from medtriage.serve.predictor import Predictor

ERROR = re.compile(r"\bError\b")
LONG_LABELS = [
    "consolidation of the right lower lobe with air bronchograms and effusion",  # 72 characters
    "consolidation of the right lower lobe without air bronchograms",  # shares its first 16 characters
]


@pytest.fixture(scope="module")
def dciodvfy(need_tool) -> str:
    return need_tool("dciodvfy", "apt-get install dicom3tools")


def _errors(dciodvfy: str, data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "report.dcm"
    path.write_bytes(data)
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    return [line.strip() for line in (done.stdout + done.stderr).splitlines() if ERROR.search(line)]


def _labelled(predictor, path: Path, positive: str, finding: str):
    """The scores of `path` as a package whose labels are `LONG_LABELS` would give them, and that package."""
    meta = {**predictor.package.meta, "label_names": list(LONG_LABELS), "positive_label": positive}
    package = ModelPackage(predictor.package.directory, meta)
    scores = [dataclasses.replace(s, finding=finding, positive_label=positive) for s in predictor.score_or_reject(path, path.name)]
    return scores, package


def _codes(sr: pydicom.Dataset) -> dict[str, str]:
    """Code Value -> Code Meaning of every code in the SR's content in the private scheme."""
    found: dict[str, set[str]] = {}

    def visit(ds, elem):
        if elem.keyword == "CodeValue" and ds.get("CodingSchemeDesignator") == "99MEDTRIAGE":
            found.setdefault(ds.CodeValue, set()).add(str(ds.CodeMeaning))

    content = pydicom.Dataset()
    content.ContentSequence = sr.ContentSequence
    content.walk(visit)
    return found


@pytest.mark.parametrize("finding", [0, 1], ids=["positive", "other"])
def test_a_label_longer_than_a_code_meaning_still_gives_a_valid_report(predictor, dciodvfy, tmp_path, finding):
    path = Path(get_testdata_file("CT_small.dcm"))
    scores, package = _labelled(predictor, path, LONG_LABELS[0], LONG_LABELS[finding])
    data = sr_bytes(path.read_bytes(), scores, package)
    errors = _errors(dciodvfy, data, tmp_path)
    assert not errors, "\n".join(errors)
    codes = _codes(pydicom.dcmread(io.BytesIO(data)))
    assert all(len(meanings) == 1 for meanings in codes.values()), codes  # one concept per code value


def test_two_long_labels_get_two_code_values(predictor):
    path = Path(get_testdata_file("CT_small.dcm"))
    values = []
    for label in LONG_LABELS:
        scores, package = _labelled(predictor, path, LONG_LABELS[0], label)
        sr = pydicom.dcmread(io.BytesIO(sr_bytes(path.read_bytes(), scores, package)))
        # the finding's codes: the probability's ("p-...") is of the positive label, LONG_LABELS[0] both times
        findings = {value: meanings for value, meanings in _codes(sr).items() if not value.startswith("p-")}
        values.append({value for value, meanings in findings.items() if any(label[:40] in m for m in meanings)})
    assert values[0] and values[1] and not values[0] & values[1]


def test_copied_values_longer_than_their_vr_allows_cost_those_values_not_the_report(predictor, dciodvfy, tmp_path):
    """Before, the SR carried them as they were, and a strict PACS refuses the whole object. What the report is filed
    by (Patient ID, Accession Number) stays as the source has it: the PACS holds the source with those values."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.PatientID = "P" * 70  # LO: 64
    source.AccessionNumber = source.StudyID = "A" * 20  # SH: 16
    source.ReferringPhysicianName = "R" * 70 + "^JULIUS"  # PN: 64 per component group
    path = tmp_path / "long_values.dcm"
    source.save_as(path, enforce_file_format=True)
    scores = predictor.score_or_reject(path, path.name)
    data = sr_bytes(path.read_bytes(), scores, predictor.package)
    errors = [e for e in _errors(dciodvfy, data, tmp_path) if "contains invalid data values" not in e]  # the summary
    assert sorted(e.split(") ")[1].split("  ")[0] for e in errors) == ["LO Patient ID", "SH Accession Number"], errors
    sr = pydicom.dcmread(io.BytesIO(data))
    assert (sr.StudyID, str(sr.ReferringPhysicianName)) == ("", "")
    assert (sr.PatientID, sr.AccessionNumber) == (source.PatientID, source.AccessionNumber)
    assert (sr.StudyInstanceUID, sr.PatientName) == (source.StudyInstanceUID, source.PatientName)  # still the study's report


@pytest.mark.parametrize(
    ("charset", "name", "label"),
    [(None, "modèle-pneumonie", "Lungenentzündung"), ("ISO_IR 100", "pneumonia-el", "πνευμονία")],
    ids=["ascii-source", "latin1-source"],
)
def test_text_the_source_character_set_cannot_hold_is_written_in_one_that_can(predictor, dciodvfy, tmp_path, charset, name, label):
    """A package's name and labels are its own text: an SR for a source in the default repertoire (ASCII), or in
    Latin-1, must declare a character set that holds them, or readers show other characters than were meant."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.SpecificCharacterSet = charset
    if charset is None:
        del source.SpecificCharacterSet
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    meta = {**predictor.package.meta, "name": name, "label_names": ["normal", label], "positive_label": label}
    scores = [dataclasses.replace(s, model=name, finding=label, positive_label=label) for s in predictor.score_or_reject(path, path.name)]
    data = sr_bytes(path.read_bytes(), scores, ModelPackage(predictor.package.directory, meta))
    errors = _errors(dciodvfy, data, tmp_path)
    assert not errors, "\n".join(errors)
    sr = pydicom.dcmread(io.BytesIO(data))
    assert sr.ManufacturerModelName == name and label in {m for meanings in _codes(sr).values() for m in meanings}
    assert sr.PatientName == source.PatientName


def test_the_heatmap_leaves_out_what_its_vr_does_not_allow_and_declares_the_letters_of_its_package_name(predictor, dciodvfy, tmp_path):
    """Before, the heatmap copied a Study ID of 20 characters as it was, and wrote the package's name in Latin-1
    bytes without a character set: dciodvfy found both invalid, and a strict PACS refuses the whole image."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.StudyID = "A" * 20  # SH: 16
    source.ReferringPhysicianName = "R" * 70 + "^JULIUS"  # PN: 64 per component group
    del source.SpecificCharacterSet
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    named = Predictor(ModelPackage(predictor.package.directory, {**predictor.package.meta, "name": "modèle-pneumonie"}), threads=1)
    scores = named.score_or_reject(path, path.name)
    data = encoded(secondary_capture(named, path, scores[0]), "the heatmap", path.name)
    errors = _errors(dciodvfy, data, tmp_path)
    assert not errors, "\n".join(errors)
    heatmap = pydicom.dcmread(io.BytesIO(data))
    assert (heatmap.StudyID, str(heatmap.ReferringPhysicianName), heatmap.SpecificCharacterSet) == ("", "", "ISO_IR 192")
    assert "modèle-pneumonie" in heatmap.SeriesDescription and heatmap.StudyInstanceUID == source.StudyInstanceUID
