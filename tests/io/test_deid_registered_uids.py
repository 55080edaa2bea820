"""UIDs under the DICOM root (1.2.840.10008). Before, `SiteKey.uid` kept every value that began with the root as a
registered UID: anyone can append to it, so a site's own instance UIDs under it, or a class UID followed by a name and
a Patient ID, were pooled as read. Only the UIDs the standard registers (as pydicom's UID dictionary knows them) stay;
any other value becomes a `2.25` UID like every UID outside the root, in references and in kept text alike."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from medtriage.io.deid import deidentify
from medtriage.io.site_key import SiteKey, is_registered_uid
from tests.io.test_deid_edges import _reread

KEY = SiteKey(b"registered-uids-secret-0123456789ab")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
REGISTERED = (
    CT_IMAGE,
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.20.1.1",  # Storage Commitment Push Model SOP Instance (a well-known instance)
    "1.2.840.10008.1.4.1.1",  # Talairach Brain Atlas Frame of Reference (a well-known frame of reference)
    "1.2.840.10008.2.16.4",  # DICOM Controlled Terminology (a coding scheme)
)
UNREGISTERED = (
    f"{CT_IMAGE} St Elsewhere MRN-4711",  # a class followed by a name and a Patient ID
    f"{CT_IMAGE}.99.4711",  # a site's instance UID under the DICOM root
    "1.2.840.10008.99.4711.20230115",
    "1.2.840.10008.05.1.4.1.1.2",  # a component with a leading zero: no UID
    "1.2.840.10008." + "1" * 60,  # longer than 64 characters
    "1.2.840.10008.",
)


def test_every_registered_uid_has_uid_syntax_under_the_dicom_root():
    """`is_registered_uid` relies on pydicom's dictionary holding UIDs only, all under the DICOM root."""
    assert all(pydicom.uid.UID(uid).is_valid and is_registered_uid(uid) for uid in UID_dictionary)
    assert not is_registered_uid(f"{CT_IMAGE}.99.4711") and not is_registered_uid(CT_IMAGE + " ")


@pytest.mark.parametrize("uid", REGISTERED)
def test_registered_uids_stay(uid):
    assert KEY.uid(uid) == KEY.uid(uid + "\0") == uid


@pytest.mark.parametrize("uid", UNREGISTERED)
def test_other_values_under_the_dicom_root_are_remapped(uid):
    new = KEY.uid(uid)
    assert new.startswith("2.25.") and pydicom.uid.UID(new).is_valid and new == KEY.uid(uid + " ")


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_a_sites_uids_under_the_dicom_root_are_remapped_and_registered_classes_stay(syntax):
    """A study UID the site built under the DICOM root, a referenced instance under it quoted in a note too, and a class
    attribute holding a name beside its class: remapped. Registered classes, in class attributes and in references,
    and a well-known instance, stay."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, other, tagged = f"{CT_IMAGE}.99.4711", f"{CT_IMAGE}.99.4712", f"{CT_IMAGE} St Elsewhere MRN-4711"
    far = f"{CT_IMAGE}.99.4713"  # quoted in text only
    ds.StudyInstanceUID = study
    reference, well_known, named = Dataset(), Dataset(), Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = CT_IMAGE, other
    well_known.ReferencedSOPClassUID = "1.2.840.10008.1.20.1"
    well_known.ReferencedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    named.ReferencedSOPClassUID, named.ReferencedSOPInstanceUID = tagged, ds.SOPInstanceUID
    ds.ReferencedInstanceSequence = [reference, well_known, named]
    ds.ContentDescription = f"prior {other}"
    ds.CalibrationNotes = f"compare {far}, a study of another file; sent as {REGISTERED[1]}"  # LT
    ds = _reread(ds, syntax)
    deidentify(ds, KEY)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert not [v for v in (study, other, far, "St Elsewhere", "MRN-4711") if v.encode() in data]
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.StudyInstanceUID == KEY.uid(study) and ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE
    reference, well_known, named = ds.ReferencedInstanceSequence
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (CT_IMAGE, KEY.uid(other))
    assert (well_known.ReferencedSOPClassUID, well_known.ReferencedSOPInstanceUID) == ("1.2.840.10008.1.20.1", "1.2.840.10008.1.20.1.1")
    assert named.ReferencedSOPClassUID == KEY.uid(tagged)
    assert ds.ContentDescription == f"prior {KEY.uid(other)}"
    assert ds.CalibrationNotes == f"compare {KEY.uid(far)}, a study of another file; sent as {REGISTERED[1]}"
