"""The heatmap Secondary Capture and the saliency overlay of sources without some of their UIDs (removed or emptied by
a de-identifier or converter), or with a value that cannot be read: pydicom's own test files, altered. Each gives a
valid object, or a refusal naming what is missing and what to do, never an AttributeError's text or a traceback."""

from __future__ import annotations

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medtriage.errors import DicomError
from medtriage.serve.dicom_results import encoded
from medtriage.serve.node.heatmap import secondary_capture
from medtriage.serve.saliency import write_overlay
from tests.serve.test_dicom_outputs_unreadable_values import unreadable
from tests.serve.test_dicom_outputs_validate import validation_errors

SOURCES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm"]  # the last multi-frame
REFERENCED_ONLY = ["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID"]


@pytest.fixture(scope="module")
def dciodvfy(need_tool) -> str:
    return need_tool("dciodvfy", "apt-get install dicom3tools")


def _without(folder, name: str, keyword: str, emptied: bool = False):
    """pydicom's `name` written to `folder` with `keyword` deleted, or present and empty."""
    ds = pydicom.dcmread(get_testdata_file(name))
    if emptied:
        setattr(ds, keyword, "")
    else:
        delattr(ds, keyword)
    path = folder / f"{name}-no-{keyword}.dcm"
    ds.save_as(path, enforce_file_format=False)  # without its SOP class or instance UID, the file meta cannot be made
    return path


def _heatmap(predictor, path, folder):
    score = predictor.score_or_reject(path, path.name)[-1]  # a multi-frame source's last frame
    written = folder / "heatmap.dcm"
    written.write_bytes(encoded(secondary_capture(predictor, path, score, revision=1), "the heatmap", path.name))
    return written


@pytest.mark.parametrize("keyword", REFERENCED_ONLY)
@pytest.mark.parametrize("name", SOURCES)
def test_a_heatmap_of_a_source_without_a_uid_it_need_not_copy_is_valid(predictor, dciodvfy, tmp_path, name, keyword):
    path = _without(tmp_path, name, keyword)
    written = _heatmap(predictor, path, tmp_path)
    assert validation_errors(dciodvfy, written) == []
    heatmap, source = pydicom.dcmread(written), pydicom.dcmread(path)
    assert heatmap.StudyInstanceUID == source.StudyInstanceUID and heatmap.PatientID == source.PatientID
    references = heatmap.get("SourceImageSequence")  # the source instance, where it has the UIDs to name it by
    assert bool(references) == (keyword not in ("SOPInstanceUID", "SOPClassUID"))


@pytest.mark.parametrize("emptied", [False, True], ids=["deleted", "emptied"])
@pytest.mark.parametrize("name", SOURCES)
def test_a_heatmap_of_a_source_without_its_study_uid_is_refused_saying_what_to_do(predictor, tmp_path, name, emptied):
    """Deleted, the refusal was an AttributeError's text; emptied, a heatmap was made in no study."""
    path = _without(tmp_path, name, "StudyInstanceUID", emptied)
    score = predictor.score_or_reject(path, path.name)[-1]
    with pytest.raises(DicomError) as refused:
        secondary_capture(predictor, path, score, revision=1)
    assert "StudyInstanceUID (0020,000D)" in refused.value.reason and "AttributeError" not in str(refused.value)
    assert refused.value.where == score.sop_uid and "export the image again" in refused.value.hint


def test_a_heatmap_of_a_source_without_its_sop_instance_uid_names_the_file_in_a_refusal(predictor, tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SOPInstanceUID, ds.StudyInstanceUID
    path = tmp_path / "anonymous.dcm"
    ds.save_as(path, enforce_file_format=False)
    with pytest.raises(DicomError, match=r"^anonymous\.dcm: the image has no value for StudyInstanceUID"):
        secondary_capture(predictor, path, predictor.score_or_reject(path, path.name)[0])


def test_a_heatmap_of_a_source_with_an_unreadable_patient_name_leaves_it_empty(predictor, dciodvfy, tmp_path):
    """The copied values were read outside the builders' guard: the NotImplementedError escaped the node's worker,
    which caught only typed errors from the picture, and failed the study's close, SR included."""
    written = _heatmap(predictor, unreadable(tmp_path, "PatientName"), tmp_path)
    heatmap = pydicom.dcmread(written)
    assert heatmap.PatientName == "" and heatmap.PatientID == pydicom.dcmread(get_testdata_file("CT_small.dcm")).PatientID
    assert validation_errors(dciodvfy, written) == []


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", *REFERENCED_ONLY])
def test_an_overlay_of_a_source_without_a_uid_is_drawn(predictor, tmp_path, keyword):
    """The overlay is a PNG for the person scoring files: it needs no UID, and is named by the file where the SOP
    Instance UID is missing."""
    path = _without(tmp_path, "CT_small.dcm", keyword)
    scores = predictor.score_or_reject(path, path.name)
    written = write_overlay(predictor, path, scores, tmp_path / "overlays")
    assert written.name.startswith(f"{scores[0].sop_uid or path.stem}.") and Image.open(written).size == (128, 128)
