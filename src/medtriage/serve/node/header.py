"""What the node reads from an instance's header before it answers: the identifying UIDs (checked, since
they key the queue) and the worklist's study columns. Pixels are not touched here."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import UID

from medtriage.errors import DicomError
from medtriage.io.clamped import dicom_source
from medtriage.io.header_warnings import reading

STUDY_TAGS = {
    "patient_id": "PatientID",
    "accession": "AccessionNumber",
    "study_date": "StudyDate",
    "study_description": "StudyDescription",
    "modality": "Modality",
}
MAX_UID = 64  # PS3.5 6.2: a UI value is at most 64 characters


@dataclass
class Header:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str
    fields: dict


def read_identity(data: bytes | Path, where: str = "<received>") -> Header:
    """The UIDs and study fields of a Part 10 byte string or file (its header only); DicomError when they are missing
    or malformed."""
    with reading(where):  # pydicom converts values lazily: its warnings come as they are read, after dcmread
        try:
            with dicom_source(data if isinstance(data, (bytes, bytearray)) else Path(data), where) as source:
                ds = pydicom.dcmread(source, stop_before_pixels=True, force=True)
            uids = {key: _uid(ds, key) for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")}
        except DicomError:
            raise
        except Exception as err:  # a truncated or garbled header raises many kinds
            raise DicomError(f"cannot read the data set header ({type(err).__name__}: {err})", where=where) from err
        return Header(uids["SOPInstanceUID"], uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPClassUID"], study_fields(ds))


def _uid(ds: pydicom.Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip().rstrip("\x00")
    if not value or len(value) > MAX_UID or not UID(value).is_valid:
        raise DicomError(
            f"{keyword} is missing or not a valid UID ({value[:80]!r})", hint="the sending system must give each instance valid UIDs"
        )
    return value


def study_fields(ds: pydicom.Dataset) -> dict:
    """Patient (pseudonym) ID, accession, study date (ISO), description and modality; '' when absent."""
    fields = {}
    for key, keyword in STUDY_TAGS.items():
        try:
            fields[key] = str(ds.get(keyword, "") or "").strip()[:128]
        except Exception:  # noqa: BLE001 -- a malformed value only blanks its column
            fields[key] = ""
    fields["study_date"] = iso_date(fields["study_date"])
    return fields


def iso_date(value: str) -> str:
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date().isoformat()
    except ValueError:
        return value
