"""Content of the DICOM objects the system writes, as a PACS reads them: the heatmap Secondary Capture's
patient orientation against its source (axial, lateral, unknown), and the SR's device observer identity,
fresh UIDs across two reports of the same study, and a report for a source whose header holds values the
standard does not allow, or whose file is gone since it was scored."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import DicomError
from medtriage.serve.dicom_results import encoded, sr_bytes, write_sr
from medtriage.serve.node.heatmap import patient_orientation, secondary_capture

DEVICE_OBSERVER_UID = "121012"


def _heatmap(predictor, path: Path) -> pydicom.Dataset:
    scores = predictor.score_or_reject(path, path.name)
    image = secondary_capture(predictor, path, scores[0])
    return pydicom.dcmread(io.BytesIO(encoded(image, "the heatmap", path.name)))


def _saved(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path)
    return path


def test_heatmap_of_an_axial_ct_is_labelled_left_and_posterior(predictor):
    # CT_small: Image Orientation (Patient) 1\0\0\0\1\0 -> rows run to the patient's left, columns to posterior
    heatmap = _heatmap(predictor, Path(get_testdata_file("CT_small.dcm")))
    assert list(heatmap.PatientOrientation) == ["L", "P"]


def test_heatmap_copies_the_source_patient_orientation(predictor, tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del source.ImageOrientationPatient, source.ImagePositionPatient
    source.PatientOrientation = ["P", "FR"]  # a lateral projection, slightly rotated
    heatmap = _heatmap(predictor, _saved(source, tmp_path / "lateral.dcm"))
    assert list(heatmap.PatientOrientation) == ["P", "FR"]


def test_heatmap_of_a_source_without_orientation_claims_none(predictor):
    # US1_UNCR: Patient Orientation present but empty, no Image Orientation (Patient)
    heatmap = _heatmap(predictor, Path(get_testdata_file("US1_UNCR.dcm")))
    assert "PatientOrientation" in heatmap and not heatmap.PatientOrientation  # Type 2: present, empty


@pytest.mark.parametrize("cosines", [b"1\\\\0\\0\\1\\0", b"a\\b\\c\\d\\e\\f"], ids=["an empty value", "letters"])
def test_heatmap_of_a_source_with_a_damaged_orientation_claims_none(predictor, tmp_path, cosines):
    """The image scores, and so gets its picture: a damaged Image Orientation (Patient) refused the whole heatmap with
    a ValueError's text, where a missing one leaves Patient Orientation empty (Type 2: unknown)."""
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    head = b"\x20\x00\x37\x00DS"  # (0020,0037), explicit VR little endian, as CT_small is written
    start = data.index(head) + len(head)
    length = int.from_bytes(data[start : start + 2], "little")
    value = cosines + b" " * (len(cosines) % 2)
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(data[:start] + len(value).to_bytes(2, "little") + value + data[start + 2 + length :])
    heatmap = _heatmap(predictor, damaged)
    assert "PatientOrientation" in heatmap and not heatmap.PatientOrientation


def _dataset(**attributes) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_heatmap_orientation_of_an_enhanced_frame_comes_from_its_functional_group():
    def plane(cosines):
        return _dataset(PlaneOrientationSequence=[_dataset(ImageOrientationPatient=cosines)])

    sagittal, oblique = [0, 1, 0, 0, 0, -1], [0.94, 0.34, 0, 0, 0, -1]
    source = _dataset(PerFrameFunctionalGroupsSequence=[plane(sagittal), plane(oblique)])
    assert patient_orientation(source, 1) == ["P", "F"]
    assert patient_orientation(source, 2) == ["LP", "F"]
    assert patient_orientation(_dataset(SharedFunctionalGroupsSequence=[plane(sagittal)]), 2) == ["P", "F"]


def _device_observer_uid(sr: pydicom.Dataset) -> str:
    items = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == DEVICE_OBSERVER_UID]
    assert len(items) == 1
    return items[0].UID


def test_two_reports_of_one_study_share_the_device_observer_but_no_instance_uid(predictor):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    scores = predictor.score_or_reject(io.BytesIO(data), "CT_small.dcm")
    first, second = (pydicom.dcmread(io.BytesIO(sr_bytes(data, scores, predictor.package))) for _ in range(2))
    assert _device_observer_uid(first) == _device_observer_uid(second)  # the same device made both
    assert first.SOPInstanceUID != second.SOPInstanceUID and first.SeriesInstanceUID != second.SeriesInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID


def test_a_header_value_the_standard_does_not_allow_costs_that_value_not_the_report(predictor, tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.PatientSex, source.PatientBirthDate, source.StudyDate, source.StudyTime = "X", "1990-01-01", "2024-13-45", "25:99"
    path = _saved(source, tmp_path / "odd_header.dcm")
    scores = predictor.score_or_reject(path, path.name)
    sr = pydicom.dcmread(io.BytesIO(sr_bytes(path.read_bytes(), scores, predictor.package)))
    assert (sr.PatientSex, sr.PatientBirthDate, sr.StudyDate, sr.StudyTime) == ("", "", "", "")
    assert (sr.PatientID, sr.PatientName, sr.StudyInstanceUID) == (source.PatientID, source.PatientName, source.StudyInstanceUID)


def test_an_sr_of_a_file_gone_since_it_was_scored_says_so_and_what_to_do(predictor, tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    scores = predictor.score_or_reject(path, path.name)
    path.unlink()  # moved away while the rest of the folder was scored
    with pytest.raises(DicomError) as raised:
        write_sr(path, scores, predictor.package, str(tmp_path / "sr"))
    assert "cannot read the file again" in raised.value.reason and "No such file" in raised.value.reason
    assert raised.value.where == str(path) and "leave the file in place" in raised.value.hint
