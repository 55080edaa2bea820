"""The SR and the heatmap for sources as archives hold them, checked by dicom3tools' dciodvfy and dcmtk's dsrdump: an
image of a SOP class highdicom's edition of the standard does not list (the retired ultrasound class of 1993, a vendor's
private class), and a header whose Specific Character Set is misspelt as modalities in the wild write it, or written
with the empty first value the standard itself shows for Japanese."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtriage.cli import main
from medtriage.serve.dicom_results import encoded, sr_bytes
from medtriage.serve.node.heatmap import secondary_capture

ERROR = re.compile(r"\bError\b")
PRIVATE_CLASS = "1.2.840.113619.4.26"  # a vendor's private image storage class


@pytest.fixture(scope="module")
def dciodvfy(need_tool) -> str:
    return need_tool("dciodvfy", "apt-get install dicom3tools")


@pytest.fixture(scope="module")
def dsrdump(need_tool) -> str:
    return need_tool("dsrdump", "apt-get install dcmtk")


def _complaints(dciodvfy: str, dsrdump: str, path: Path, standard_class: bool) -> list[str]:
    """dciodvfy's errors and what dsrdump, reading the SR's content tree, warns of or refuses. dcmtk checks an IMAGE
    item's class against the standard's image classes, so of a private class it warns whatever the SR holds."""
    checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    dumped = subprocess.run([dsrdump, "-Ee", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    errors = [line.strip() for line in (checked.stdout + checked.stderr).splitlines() if ERROR.search(line)]
    dsr = [line for line in (dumped.stdout + dumped.stderr).splitlines() if line.startswith(("W:", "E:", "F:"))]
    return errors + (dsr if standard_class else [line for line in dsr if not re.search("unknown image SOP class|item IMAGE", line)])


def _references(sr: pydicom.Dataset) -> set[tuple[str, str]]:
    """(SOP class, SOP instance) of every instance the SR's evidence sequence names."""
    return {
        (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def _copy(folder: Path, name: str, sop_class: str | None = None) -> Path:
    """The test file `name` as a new instance of a new study (`color-pl.dcm`'s own UIDs have an illegal root, which
    the SR must copy as they are), of `sop_class` where given."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class or ds.SOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    folder.mkdir()
    ds.save_as(folder / name)
    return folder / name


SOURCES = {
    "retired ultrasound class": lambda folder: _copy(folder, "color-pl.dcm"),
    "private class": lambda folder: _copy(folder, "CT_small.dcm", PRIVATE_CLASS),
}


@pytest.mark.parametrize("source", SOURCES)
def test_an_image_of_a_class_highdicom_does_not_list_gets_a_valid_sr_naming_its_class(source, package_dir, dciodvfy, dsrdump, tmp_path):
    """highdicom chose the patient and study attributes to copy by the IOD of the source's class, and failed with a
    KeyError on every class missing from its tables: the image scored, but `score --sr` wrote no SR for it."""
    path = SOURCES[source](tmp_path / "in")
    assert main(["score", str(package_dir), str(path), "--sr", str(tmp_path / "sr")]) == 0
    [written] = sorted((tmp_path / "sr").glob("*.SR.dcm"))
    assert not _complaints(dciodvfy, dsrdump, written, standard_class=source != "private class")
    sr, ds = pydicom.dcmread(written), pydicom.dcmread(path, stop_before_pixels=True)
    assert _references(sr) == {(str(ds.SOPClassUID), str(ds.SOPInstanceUID))}
    copied = ("StudyInstanceUID", "PatientID", "PatientName")
    assert [sr.get(keyword) or "" for keyword in copied] == [ds.get(keyword) or "" for keyword in copied]


CHARACTER_SETS = {
    "ISO_IR100": ("ISO_IR100", "Müller^Jörg"),  # the space left out, as older modalities write it
    "ISO-8859-1": ("ISO-8859-1", "Müller^Jörg"),  # the IANA name for ISO_IR 100
    "\\ISO 2022 IR 87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),  # PS3.5 H.3.1: an empty first value is valid
}


@pytest.mark.parametrize("declared", CHARACTER_SETS)
def test_a_source_whose_character_set_pydicom_reads_gets_a_valid_sr_and_heatmap_with_its_names_intact(
    declared, predictor, dciodvfy, tmp_path
):
    """pydicom reads these headers (a misspelt term as what it stands for), and the image scored, but highdicom refused
    to copy the value into the SR or the heatmap: no report for the image, or one where its names were garbled."""
    character_set, name = CHARACTER_SETS[declared]
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.SpecificCharacterSet, source.PatientName = character_set, name
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    scores = predictor.score_or_reject(path, path.name)
    written = {
        "SR": sr_bytes(path.read_bytes(), scores, predictor.package),
        "heatmap": encoded(secondary_capture(predictor, path, scores[0]), "the heatmap", path.name),
    }
    for kind, data in written.items():
        (tmp_path / kind).write_bytes(data)
        checked = subprocess.run([dciodvfy, str(tmp_path / kind)], capture_output=True, text=True, errors="replace", timeout=60)
        assert not [line for line in (checked.stdout + checked.stderr).splitlines() if ERROR.search(line)], kind
        assert str(pydicom.dcmread(io.BytesIO(data)).PatientName) == name, kind
