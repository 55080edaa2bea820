"""Kept text quoting another instance's UIDs (a WADO URL copied into a description, naming a study and an object of
another file of the site): the quoted UIDs map as that instance's own UIDs do with the same key, so that the reference
still resolves inside the pool and no longer leads back to the site's archive. UIDs of the DICOM standard, a vendor's
class in a class attribute, version strings and addresses stay as they were. (Address attributes themselves, VR UR, are
removed: `test_deid_addresses.py`.)"""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from medtriage.io.deid import deidentify
from medtriage.io.part10 import encode
from medtriage.io.site_key import SiteKey
from tests.io.test_deid_edges import _reread

KEY = SiteKey(b"quoted-uids-secret-0123456789abcdef")
SYNTAX = "1.2.840.10008.1.2.4.50"  # names an encoding, not an instance
SNOMED = "2.16.840.1.113883.6.96"  # HL7's OID of a code system
VENDOR_CLASS = "1.2.840.113619.4.26"  # a vendor's private SOP class, as a class attribute keeps it
NOT_UIDS = "viewer 3.14.2 on 192.168.100.200, build 2.1.0.4, dated 2023.01.15, pi 3.14159265358979"


def _other() -> Dataset:
    """Another file of the site: the instance the text names."""
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


def _wado(study: str, sop: str, vendor_class: str) -> str:
    return (
        f"https://pacs.example/wado?requestType=WADO&studyUID={study}&objectUID={sop}&classUID={vendor_class}"
        f"&transferSyntax={SYNTAX}&code={SNOMED}&note={NOT_UIDS.replace(' ', '+')}"
    )


def _note(study: str, sop: str, vendor_class: str) -> str:
    return f"prior in study {study}.\r\nCompare {sop} (class {vendor_class}, sent as {SYNTAX}, code {SNOMED}); {NOT_UIDS}."


def _top_level_text(ds: Dataset, value: str) -> None:
    ds.ImageFilterDescription = value  # UT, kept by the profile


def _text_in_a_reference(ds: Dataset, value: str) -> None:
    item = Dataset()
    item.SeriesInstanceUID, item.ImageFilterDescription = ds.SeriesInstanceUID, value
    ds.ReferencedSeriesSequence = [item]  # kept, its items walked


def _free_text(ds: Dataset, value: str) -> None:
    ds.DetectorDescription = value  # LT, kept by the profile


def _kept_value(ds: Dataset, where) -> str:
    if where is _text_in_a_reference:
        return ds.ReferencedSeriesSequence[0].ImageFilterDescription
    return ds.ImageFilterDescription if where is _top_level_text else ds.DetectorDescription


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
@pytest.mark.parametrize(
    ("where", "text"),
    [(_top_level_text, _wado), (_text_in_a_reference, _wado), (_free_text, _note)],
    ids=["url_in_text", "url_in_text_in_reference", "detector_description"],
)
def test_another_instances_uids_quoted_in_kept_text_map_as_that_instance_maps_them(where, text, syntax):
    """Before, only the data set's own UIDs were remapped in kept text: the study and object UIDs of another file of
    the site stayed as read in a pooled file, and named the hospital's records."""
    other = _other()
    study, sop = str(other.StudyInstanceUID), str(other.SOPInstanceUID)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = VENDOR_CLASS
    where(ds, text(study, sop, VENDOR_CLASS))
    ds = _reread(ds, syntax)
    deidentify(ds, KEY)
    pooled = deidentify(other, KEY)
    data = encode(ds)
    assert study.encode() not in data and sop.encode() not in data
    ds = pydicom.dcmread(io.BytesIO(data))
    assert _kept_value(ds, where).rstrip() == text(pooled.study_uid, pooled.sop_uid, KEY.uid(VENDOR_CLASS))
    assert ds.SOPClassUID == VENDOR_CLASS  # a class attribute keeps the vendor's class: quoting it made it no own UID
