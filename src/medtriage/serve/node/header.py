"""What the node reads from an instance's header before it answers: the identifying UIDs (checked, since
they key the queue) and the worklist's study columns. Pixels are not touched here, nor is any other element: the
handler of each association reads this at once, and an instance may carry gigabytes before its Pixel Data (a
private element, an overlay). Only the elements named are read (the others are skipped, not read), reading stops
after the last of them, and what is read is bounded (HEADER_READ_BYTES): a sequence of undefined length must be
parsed to be skipped, and one that holds more is refused before it is read into memory."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.filereader import read_dataset, read_partial
from pydicom.uid import UID

from medtriage.errors import DicomError
from medtriage.io.clamped import dicom_source
from medtriage.io.decode_limits import inflating_reader
from medtriage.io.header_warnings import reading

STUDY_TAGS = {
    "patient_id": "PatientID",
    "accession": "AccessionNumber",
    "study_date": "StudyDate",
    "study_description": "StudyDescription",
    "modality": "Modality",
}
MAX_UID = 64  # PS3.5 6.2: a UI value is at most 64 characters
IDENTITY_TAGS = {
    "SpecificCharacterSet": 0x00080005,  # how the study fields' text is encoded
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyDate": 0x00080020,
    "AccessionNumber": 0x00080050,
    "Modality": 0x00080060,
    "StudyDescription": 0x00081030,
    "PatientID": 0x00100020,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}
LAST_IDENTITY_TAG = max(IDENTITY_TAGS.values())
HEADER_READ_BYTES = 4 << 20  # what reading them may read: the elements before (0020,000E) of any real instance are far less


class ReadBudget:
    """A file whose reads together may not pass `budget` bytes (seeks are free): `refused()` is raised before a read
    that would. A deflated data set is read as it inflates (io.decode_limits.InflatingReader): a skip inflates what
    it passes, without keeping it."""

    def __init__(self, file, budget: int, refused: Callable[[], DicomError]):
        self._file, self._left, self._refused = file, budget, refused

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return self._file.read()
        if n > self._left:
            raise self._refused()
        self._left -= n
        return self._file.read(n)

    def __getattr__(self, name: str):  # seek, tell, name ... as the file has them
        return getattr(self._file, name)


def _identity_too_far(where: str) -> DicomError:
    return DicomError(
        f"the data set header before its Series Instance UID holds over {HEADER_READ_BYTES} bytes to read",
        where=where,
        hint="the sending system must send the identifying elements (group 0008 to 0020) without bulk data among them",
    )


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
                ds = _read_header(source, where)
            uids = {key: _uid(ds, key) for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")}
        except DicomError:
            raise
        except Exception as err:  # a truncated or garbled header raises many kinds
            raise DicomError(f"cannot read the data set header ({type(err).__name__}: {err})", where=where) from err
        return Header(uids["SOPInstanceUID"], uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPClassUID"], study_fields(ds))


def _read_header(source, where: str) -> pydicom.Dataset:
    """The identity elements, read within HEADER_READ_BYTES. A deflated data set is read as it inflates, where pydicom
    would inflate all of it (up to the decode limits: a GB per association) to read them."""
    deflated = inflating_reader(source)
    budget = ReadBudget(source if deflated is None else deflated, HEADER_READ_BYTES, lambda: _identity_too_far(where))

    def past_identity(tag, _vr, _length) -> bool:
        return tag > LAST_IDENTITY_TAG

    if deflated is None:
        return read_partial(budget, stop_when=past_identity, force=True, specific_tags=list(IDENTITY_TAGS.values()))
    return read_dataset(budget, False, True, stop_when=past_identity, specific_tags=list(IDENTITY_TAGS.values()))


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
