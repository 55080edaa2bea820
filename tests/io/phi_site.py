"""A tiny site export built from pydicom's real test files, with fake PHI planted everywhere a
hospital would leave it: standard attributes, private elements, references inside sequences.
Plus the inputs that must land in quarantine: truncated, not DICOM, burned-in, duplicate, SR.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

PATIENTS = [
    dict(
        PatientName="DOEHRING^JANETTE^Q",
        PatientID="MRN-47110815",
        PatientBirthDate="19610203",
        PatientAddress="742 Evergreen Terrace, Springfield",
        OtherPatientIDs="OTHERID-99871",
        PatientTelephoneNumbers="+1-555-0100-7788",
        PatientMotherBirthName="KRABAPPEL^EDNA",
    ),
    dict(
        PatientName="VANHOUTEN^MILHOUSE",
        PatientID="MRN-08154711",
        PatientBirthDate="19790512",
        PatientAddress="316 Pikeland Avenue, Springfield",
        OtherPatientIDs="OTHERID-12377",
        PatientTelephoneNumbers="+1-555-0199-2233",
        PatientMotherBirthName="BOUVIER^LUANN",
    ),
]
SITE_PHI = dict(
    InstitutionName="Saint Elsewhere General Hospital",
    InstitutionAddress="1 Hospital Road, Shelbyville",
    ReferringPhysicianName="HIBBERT^JULIUS",
    PerformingPhysicianName="RIVIERA^NICHOLAS",
    OperatorsName="TECHNICIAN^TOMASZ",
    StationName="CTSTATION7",
    DeviceSerialNumber="SN-99887766",
    InstitutionalDepartmentName="Radiology Department West",
    PhysiciansOfRecord="CARLSON^CARLTON",
    RequestingPhysician="NAHASAPEEMA^APU",
)
# (pydicom test file, patient index, study number); the last two patients' files share a study.
IMAGES = [
    ("CT_small.dcm", 0, 1),
    ("MR_small.dcm", 0, 2),
    ("MR_small_RLE.dcm", 1, 3),
    ("emri_small.dcm", 1, 3),
    ("JPEG2000.dcm", 0, 1),
]
ROOT = "1.2.826.0.1.3680043.8.498."  # a real implementation root, so original UIDs look like a site's


def _uid(*parts) -> str:
    return generate_uid(prefix=ROOT, entropy_srcs=[str(p) for p in parts])


def _plant(ds: Dataset, patient: int, study: int, index: int, previous_sop: str | None) -> None:
    for keyword, value in {**PATIENTS[patient], **SITE_PHI}.items():
        setattr(ds, keyword, value)
    ds.AccessionNumber = f"ACC{study:04d}XZ9"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = f"2023{study:02d}1{index}"
    ds.StudyInstanceUID = _uid("study", study)
    ds.SeriesInstanceUID = _uid("series", study, index)
    ds.SOPInstanceUID = _uid("sop", index)
    ds.FrameOfReferenceUID = _uid("frame", study)
    ds.StudyDescription = f"CHEST {PATIENTS[patient]['PatientName'].split('^')[0]} FOLLOW-UP"
    if ds.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.7"):
        ds.BurnedInAnnotation = "NO"  # the site reviewed its secondary captures
    if previous_sop:  # a reference the new UIDs must keep resolving
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, previous_sop
        ds.ReferencedImageSequence = [ref]
    block = ds.private_block(0x0009, "ACME HOSPITAL PACS 1.0", create=True)
    block.add_new(0x01, "LO", SITE_PHI["OperatorsName"])  # what a vendor hides in private tags
    block.add_new(0x02, "UI", ds.StudyInstanceUID)
    block.add_new(0x03, "LO", PATIENTS[patient]["PatientID"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE_PACS"


def build_phi_site(folder: Path) -> dict:
    """Write the site export; return what the tests need to check (identifying values, expected outcomes)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, previous = [], None
    for index, (name, patient, study) in enumerate(IMAGES):
        ds = pydicom.dcmread(get_testdata_file(name))
        _plant(ds, patient, study, index, previous)
        previous = ds.SOPInstanceUID
        path = folder / f"study{study}" / f"IM{index:04d}"  # no extension, as PACS exports often are
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    quarantined = _plant_bad_inputs(folder, paths)
    _write_labels(folder, paths)
    return {"pooled": paths, "quarantined": quarantined}


def _plant_bad_inputs(folder: Path, paths: list[Path]) -> dict[str, str]:
    """File name -> the quarantine reason it must get."""
    bad = folder / "zz_more"  # sorts after the originals: the first copy of a SOP instance wins
    bad.mkdir()
    data = paths[0].read_bytes()
    (bad / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (bad / "notes.txt").write_text("patient DOEHRING called, reschedule\n")
    burned = pydicom.dcmread(paths[1])
    burned.BurnedInAnnotation, burned.SOPInstanceUID = "YES", _uid("burned")
    burned.save_as(bad / "burned.dcm", enforce_file_format=True)
    duplicate = pydicom.dcmread(paths[2])  # same SOP Instance UID, different bytes
    duplicate.InstanceNumber = 99
    duplicate.save_as(bad / "zz_duplicate.dcm", enforce_file_format=True)
    report = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    _plant(report, 0, 1, 9, None)
    report.save_as(bad / "report.dcm", enforce_file_format=True)
    return {
        "truncated.dcm": "truncated",
        "notes.txt": "not_dicom",
        "burned.dcm": "burned_in_annotation",
        "zz_duplicate.dcm": "duplicate_sop_instance",
        "report.dcm": "unsafe_sop_class",
    }


def _write_labels(folder: Path, paths: list[Path]) -> None:
    """As a hospital exports it: original SOP UIDs, plus a row for an unknown UID and one without a label."""
    rows = []
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows.append(
            {
                "sop_instance_uid": ds.SOPInstanceUID,
                "accession_number": ds.AccessionNumber,
                "finding": "pneumonia" if i % 2 else "normal",
                "comment": f"read by {SITE_PHI['PhysiciansOfRecord']}",
            }
        )
    rows.append({"sop_instance_uid": _uid("nobody"), "accession_number": "", "finding": "normal", "comment": ""})
    rows[0]["finding"] = ""
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def identifying_values(paths: list[Path]) -> set[str]:
    """Every value in the sources that identifies someone: names, IDs, dates of birth, accession numbers,
    institution, physicians, addresses, and every original UID (private elements included)."""
    found: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= _values_in(ds)
        found |= _values_in(ds.file_meta)
    return {v for v in found if len(v) >= 6}


_IDENTIFYING_KEYWORDS = {
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "PatientAddress",
    "StationName",
    "DeviceSerialNumber",
    "PatientTelephoneNumbers",
    "InstitutionalDepartmentName",
    "StudyID",
    "SourceApplicationEntityTitle",
}


_UID = re.compile(r"\d+(\.\d+){3,}")
# UIDs that name a kind of object (a vendor's private SOP class, a coding scheme), which de-identification keeps
_KIND_UID = re.compile(r"SOPClass|TransferSyntax|^(CodingScheme|Context|MappingResource)UID$")


def _values_in(ds: Dataset) -> set[str]:
    found = set()
    for elem in ds.iterall():
        if elem.VR == "SQ" or elem.value in (None, "", b""):
            continue
        values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
        for value in values:
            text = value.decode("latin-1", "ignore").strip("\0 ") if isinstance(value, bytes) else str(value).strip()
            if elem.VR == "PN":
                found.add(text)
                found |= {part for part in text.split("^") if len(part) >= 6}
            elif (
                (elem.VR == "UI" or elem.tag.is_private and _UID.fullmatch(text))
                and not text.startswith("1.2.840.10008.")
                and not _KIND_UID.search(elem.keyword)
            ):
                found.add(text)  # original UIDs, also where a vendor copied them into private elements
            elif elem.keyword in _IDENTIFYING_KEYWORDS:
                found.add(text)
    return found


def pixel_sha256(ds: Dataset) -> str:
    return hashlib.sha256(ds.PixelData).hexdigest()


def decoded_pixels_sha256(ds: Dataset) -> str:
    return hashlib.sha256(ds.pixel_array.tobytes()).hexdigest()
