"""De-identification edges on real files: compound actions of Table E.1-1 on attributes an IOD makes Type 1 (an
enhanced MR's Device Serial Number), timezone offsets inside DateTime values when Timezone Offset From UTC is
removed, UIDs, names and dates a writer encoded with another VR, the data set's own UIDs copied into attributes
the table does not list, into class attributes or into text (one only the file meta held too), and a command set
stored with the object."""

from __future__ import annotations

import io
import re
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from medtriage.io.deid import DeidOptions, deidentify
from medtriage.io.site_key import SiteKey
from tests.io.test_deid_edges import _reread

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
ERROR = re.compile(r"\bError\b")
OFFSET = re.compile(r"[+-]\d{4}$")


def _errors(dciodvfy: str, path: Path) -> set[str]:
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (done.stdout + done.stderr).splitlines() if ERROR.search(line)}


@pytest.mark.parametrize("options", [DeidOptions(), DeidOptions(modified_dates=False)], ids=["modified_dates", "no_dates"])
def test_an_enhanced_mr_keeps_its_type_1_equipment_attributes(need_tool, tmp_path, options):
    """Device Serial Number is X/Z/D in Table E.1-1 and Type 1 in Enhanced General Equipment: emptied, the
    de-identified enhanced MR is no longer a valid instance of its IOD."""
    dciodvfy = need_tool("dciodvfy", "apt-get install dicom3tools")
    source = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    source.PatientID, source.DeviceSerialNumber, source.StationName = "MRN-4711", "SN-99887766", "MRSTATION4"
    source.save_as(tmp_path / "source.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(tmp_path / "source.dcm")
    deidentify(ds, KEY, options)
    assert ds.DeviceSerialNumber and ds.DeviceSerialNumber != "SN-99887766"
    ds.save_as(tmp_path / "deid.dcm", enforce_file_format=True)
    new = _errors(dciodvfy, tmp_path / "deid.dcm") - _errors(dciodvfy, tmp_path / "source.dcm")
    assert not new, "\n".join(sorted(new))


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_datetime_values_lose_the_timezone_offset_the_profile_removes(syntax):
    """Timezone Offset From UTC (0008,0201) is X: the same offset written into a DT value says as much."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.TimezoneOffsetFromUTC = "+0100"
    ds.AcquisitionDateTime = "20230115120000.5+0100"
    ds.InstructionPerformedDateTime = ["20230115083000-0500", "20230116"]
    ds = _reread(ds, syntax)
    result = deidentify(ds, KEY)
    assert "TimezoneOffsetFromUTC" not in ds
    values = [str(ds.AcquisitionDateTime), *map(str, ds.InstructionPerformedDateTime)]
    assert not [v for v in values if OFFSET.search(v)], values
    assert values[0][8:] == "120000.5" and values[1][8:] == "083000"  # whole-day shift: the local time stays
    assert int(values[0][:4]) <= 2023 and result.date_shift_days >= 1


def test_a_table_uid_written_with_another_vr_is_remapped_like_its_references():
    """A writer that encoded Frame of Reference UID as LO (explicit VR) still wrote the original UID: the profile
    replaces it, and it must map as the same UID does where it is encoded as UI."""
    original = "1.2.826.0.1.3680043.8.498.4711"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add(DataElement(0x00200052, "LO", original))
    ds.add(DataElement(0x30060024, "UI", original))  # Referenced Frame of Reference UID, encoded as it should be
    ds = _reread(ds)
    deidentify(ds, KEY)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert original.encode() not in buffer.getvalue()
    assert str(ds.FrameOfReferenceUID) == str(ds.ReferencedFrameOfReferenceUID) == KEY.uid(original)


OWN_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_the_data_sets_own_uids_in_attributes_the_table_does_not_list_map_as_the_uids_do(syntax):
    """Before, a study, series or instance UID copied into an attribute Table E.1-1 does not list (text, bytes, UN,
    nested, one of several values) stayed as it was: the original UID links the object back to the site's archive.
    A VR too short for the new UID (SH: 16 characters) loses the element instead."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.FrameOfReferenceUID = ds.CodingSchemeVersion = "1.2.826.0.1.4711"  # short enough for SH
    sop, study, series, frame = (str(ds[k].value) for k in OWN_UIDS)
    ds.EventTimerNames = ["start", series]  # LO, several values
    ds.add(DataElement(0x00181040, "UN", frame.encode() + b" "))  # Contrast/Bolus Route (LO), written as UN
    ds.add(DataElement(0x0008041B, "OB", sop.encode() + b"\0" * (len(sop) % 2)))  # Record Key
    derivation = Dataset()
    derivation.CodeValue, derivation.CodeMeaning = "113076", study  # a nested attribute the table does not list
    ds.DerivationCodeSequence = [derivation]
    ds = _reread(ds, syntax)
    deidentify(ds, KEY)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    leaked = [uid for uid in (sop, study, series, frame) if uid.encode() in buffer.getvalue()]
    assert not leaked
    ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert list(ds.EventTimerNames) == ["start", ds.SeriesInstanceUID] and ds.SeriesInstanceUID == KEY.uid(series)
    assert ds.ContrastBolusRoute == ds.FrameOfReferenceUID == KEY.uid(frame)
    assert "CodingSchemeVersion" not in ds
    assert ds.RecordKey.rstrip(b"\0").decode() == ds.SOPInstanceUID == KEY.uid(sop)
    derivation = ds.DerivationCodeSequence[0]
    assert (derivation.CodeValue, derivation.CodeMeaning) == ("113076", KEY.uid(study))


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_the_data_sets_own_uids_inside_kept_text_map_as_the_uids_do(syntax):
    """Before, only a kept value equal to one of the data set's own UIDs was remapped: the same UID inside a comment,
    a note or a WADO-RS address stayed, and linked the object back to the site's archive. A UID counts as a whole
    token (a longer UID it begins is another UID); a value the new UID would make longer than its VR allows goes."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.FrameOfReferenceUID = "1.2.826.0.1.4711"  # shorter than its replacement
    sop, study, series, frame = (str(ds[k].value) for k in OWN_UIDS)
    ds.ContentDescription = f"see study {study}"  # LO
    ds.CalibrationNotes = f"moved from {series}.\r\nsee {sop}, not {sop}.9 or 9.{sop}"  # LT
    ds.ImageFilterDescription = f"https://pacs.example/wado/studies/{study}/series/{series}"  # UT: a copied address
    ds.EventTimerNames = ["start", "t" * (63 - len(frame)) + " " + frame]  # LO: 64 characters, 64+ once replaced
    ds.TransformDescription = "x" * (1023 - len(frame)) + " " + frame  # ST: 1024 characters, 1024+ once replaced
    ds = _reread(ds, syntax)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert not [uid for uid in (study, series, frame) if uid.encode() in data]
    ds = pydicom.dcmread(io.BytesIO(data))
    new_sop, new_study, new_series = (KEY.uid(uid) for uid in (sop, study, series))
    assert ds.ContentDescription == f"see study {new_study}"
    # {sop}.9 is a UID of its own (another instance's, quoted), remapped whole; 9.{sop} is none (no root 9)
    assert ds.CalibrationNotes == f"moved from {new_series}.\r\nsee {new_sop}, not {KEY.uid(sop + '.9')} or 9.{sop}"
    assert ds.ImageFilterDescription == f"https://pacs.example/wado/studies/{new_study}/series/{new_series}"
    assert "EventTimerNames" not in ds and "TransformDescription" not in ds


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_the_data_sets_own_instance_uid_in_a_class_attribute_maps_as_the_uid_does(syntax):
    """Class UIDs stay as read, so an instance UID a writer put into a class attribute (class and instance swapped in
    a reference) stayed too, and linked the object to the site's archive. Registered classes still stay."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    swapped, registered = Dataset(), Dataset()
    swapped.ReferencedSOPClassUID, swapped.ReferencedSOPInstanceUID = sop, ds.SOPClassUID
    registered.ReferencedSOPClassUID, registered.ReferencedSOPInstanceUID = ds.SOPClassUID, sop
    ds.ReferencedSOPSequence = [swapped, registered]
    ds.SOPClassesInStudy = [ds.SOPClassUID, study]
    ds = _reread(ds, syntax)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert sop.encode() not in data and study.encode() not in data
    ds = pydicom.dcmread(io.BytesIO(data))
    swapped, registered = ds.ReferencedSOPSequence
    assert (swapped.ReferencedSOPClassUID, swapped.ReferencedSOPInstanceUID) == (ds.SOPInstanceUID, ds.SOPClassUID)
    assert (registered.ReferencedSOPClassUID, registered.ReferencedSOPInstanceUID) == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert list(ds.SOPClassesInStudy) == ["1.2.840.10008.5.1.4.1.1.2", KEY.uid(study)] and ds.SOPInstanceUID == KEY.uid(sop)


def test_the_data_sets_own_uids_in_text_written_as_bulk_data_map_as_the_uids_do():
    """Bulk data (OB, OW, UN) longer than 64 bytes was never read as text. A text attribute a writer encoded as OB
    still holds text: the study UID in its notes stayed, while pixel data stays unread."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, pixels = str(ds.StudyInstanceUID), ds.PixelData
    notes = f"calibrated for study {study} after the tube change on the first of the month"
    ds.add(DataElement(0x00143099, "OB", notes.encode()))  # Calibration Notes (LT)
    ds = _reread(ds)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert study.encode() not in data
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.CalibrationNotes.rstrip(b"\0").decode() == notes.replace(study, KEY.uid(study))
    assert ds.PixelData == pixels


def test_a_command_set_stored_with_the_object_is_removed():
    """Some systems store the command set (group 0000) of the message an object came in: pydicom reads it with the data
    set, yet no file may hold one, so the de-identified object could not be written, and its Move Originator names a
    station of the site."""
    buffer = io.BytesIO()
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    start = 144 + struct.unpack("<L", data[140:144])[0]  # after the file meta and its group length
    command = b"".join(  # implicit VR little endian, as a command set is always encoded
        struct.pack("<HHL", 0, element, len(value)) + value
        for element, value in ((0x0100, struct.pack("<H", 1)), (0x0110, struct.pack("<H", 7)), (0x1030, b"RADIOLOGY_WS3 "))
    )
    ds = pydicom.dcmread(io.BytesIO(data[:start] + command + data[start:]))
    assert ds.MoveOriginatorApplicationEntityTitle == "RADIOLOGY_WS3"
    deidentify(ds, KEY)
    assert not [tag for tag in ds.keys() if tag >> 16 == 0]
    assert b"RADIOLOGY_WS3" not in _saved(ds)


def test_an_unlisted_uid_name_or_date_written_with_another_vr_is_treated_as_its_attribute_is():
    """Table E.1-1 does not list every UID, name and date attribute: those it does not list are remapped, emptied or
    shifted by their VR. Before, the VR an explicit VR file gave them decided, so written as LO they stayed as read:
    another instance's UID, an evaluator's name, a calibration date in an object marked MODIFIED (or as OB bytes)."""
    source, name, day = "1.2.826.0.1.3680043.8.498.777", "DOE^JANE", "20230115"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add(DataElement(0x00081167, "LO", source))  # Multi-frame Source SOP Instance UID (UI)
    ds.add(DataElement(0x00142006, "LO", name))  # Evaluator Name (PN)
    ds.add(DataElement(0x00143076, "LO", day))  # Date of Gain Calibration (DA)
    ds.add(DataElement(0x00141020, "OB", day.encode()))  # Expiry Date (DA)
    ds = _reread(ds)
    deidentify(ds, KEY)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert not [v for v in (source, name, day) if v.encode() in buffer.getvalue()]
    ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert ds.MultiFrameSourceSOPInstanceUID == KEY.uid(source)
    assert not ds.EvaluatorName
    assert "19000101" < ds.DateOfGainCalibration < day
    assert not ds.ExpiryDate  # as bytes: no date to shift


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_without_modified_dates_the_dates_the_table_does_not_list_are_removed_too(syntax):
    """Before, a date in an attribute Table E.1-1 does not list stayed as it was, in an object marked REMOVED
    (Longitudinal Temporal Information Modified); with modified dates it is shifted like every other date."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.DateOfGainCalibration, ds.StudyUpdateDateTime = "20230115", "20230115120000"
    for modified in (False, True):
        out = _reread(ds.copy(), syntax)
        deidentify(out, KEY, DeidOptions(modified_dates=modified))
        kept = [str(out.DateOfGainCalibration or ""), str(out.StudyUpdateDateTime or "")]
        if modified:
            assert out.LongitudinalTemporalInformationModified == "MODIFIED" and "" not in kept
            assert kept[0] < "20230115" and kept[1][8:] == "120000"  # shifted back, whole days
        else:
            assert out.LongitudinalTemporalInformationModified == "REMOVED" and kept == ["", ""]


def test_an_animal_patient_keeps_its_owner_attributes_empty(need_tool, tmp_path):
    """Responsible Person and Responsible Organization are X in Table E.1-1 but Type 2C for an animal patient: removed,
    deid-data's cat came out an invalid instance of its IOD (dciodvfy: missing Type 2C attributes)."""
    from deid_data import __file__ as deid_data_root

    dciodvfy = need_tool("dciodvfy", "apt-get install dicom3tools")
    source = Path(deid_data_root).parent / "data" / "animals" / "cat.dcm"
    ds = pydicom.dcmread(source)
    ds.ResponsiblePerson, ds.ResponsibleOrganization = "Smith^Jane", "Oak Street Veterinary Clinic"
    deidentify(ds, KEY)
    assert (ds.ResponsiblePerson, ds.ResponsibleOrganization) == ("", "")
    ds.save_as(tmp_path / "deid.dcm", enforce_file_format=True)
    new = _errors(dciodvfy, tmp_path / "deid.dcm") - _errors(dciodvfy, source)
    assert not new, "\n".join(sorted(new))


def test_an_instance_uid_only_the_file_meta_held_is_not_kept_in_text():
    """A file whose SOP Instance UID was changed without its file meta: the old UID, quoted in a kept comment, stayed
    (the file meta is rebuilt, so it was never among the data set's own UIDs)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stored_as = "1.2.826.0.1.3680043.2.1125.7.4711"
    ds.file_meta.MediaStorageSOPInstanceUID = stored_as
    ds.ContentDescription = f"copy of {stored_as}"
    deidentify(ds, KEY)
    data = _saved(ds)
    assert stored_as.encode() not in data
    assert pydicom.dcmread(io.BytesIO(data)).ContentDescription == f"copy of {KEY.uid(stored_as)}"
