"""Identity that reached the pool past the profile: a sequence a writer encoded with another VR (its items kept as
bytes, never cleaned), identifying attributes Table E.1-1 does not list (a birth date in another calendar, an animal's
breed registration number, the scheduled step's comments, an earlier de-identifier's encrypted original attributes),
and an overlay drawn in the unused high bits of the pixel data, whose attributes went while its bits stayed; and a
Burned In Annotation a writer gave several values, read as one text."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from medtriage.io.deid import deidentify
from medtriage.io.ingest import ingest_site
from medtriage.io.quarantine import screen
from medtriage.io.site_key import SiteKey
from tests.io.test_deid_edges import _reread

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
CAT = Path(__import__("deid_data").__file__).parent / "data" / "animals" / "cat.dcm"


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _leaked(ds: Dataset, values) -> list[str]:
    data = _saved(ds)
    return [v for v in values if v.encode() in data]


@pytest.mark.parametrize("vr", [b"OB", b"UT"])
def test_a_sequence_a_writer_encoded_with_another_vr_is_removed_not_kept_as_bytes(vr):
    """Items read as bytes or text are not data sets the profile can walk: the names, institution and instance UIDs
    inside them stayed as read."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    equipment, reference = Dataset(), Dataset()
    equipment.PatientName, equipment.InstitutionName = "DOEHRING^JANETTE", "Saint Elsewhere General"
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.826.0.1.3680043.8.498.4711"
    ds.ContributingEquipmentSequence, ds.ReferencedImageSequence = [equipment], [reference]
    data = _saved(ds)
    for tag in (b"\x18\x00\x01\xa0", b"\x08\x00\x40\x11"):  # (0018,A001) and (0008,1140), as they lie in the file
        at = data.index(tag + b"SQ")
        data = data[: at + 4] + vr + data[at + 6 :]
    ds = pydicom.dcmread(io.BytesIO(data))
    deidentify(ds, KEY)
    assert not _leaked(ds, ["DOEHRING", "Elsewhere", "1.2.826.0.1.3680043.8.498.4711"])
    assert "ContributingEquipmentSequence" not in ds and "ReferencedImageSequence" not in ds


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_identifying_attributes_the_table_does_not_list_are_removed(syntax):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientBirthDateInAlternativeCalendar = "SHOWA 36.02.03"
    ds.PatientDeathDateInAlternativeCalendar = "REIWA 05.01.17"
    ds.PatientAlternativeCalendar = "JAPANESE"
    ds.CommentsOnTheScheduledProcedureStep = "call Mrs Doehring on 555-0100 before the scan"
    encrypted = Dataset()
    encrypted.EncryptedContentTransferSyntaxUID = "1.2.840.10008.1.2.1"
    encrypted.EncryptedContent = b"CMS enveloped original attributes: MRN-47110815 DOEHRING^JANETTE "
    ds.EncryptedAttributesSequence = [encrypted]
    ds = _reread(ds, syntax)
    deidentify(ds, KEY)
    assert not _leaked(ds, ["SHOWA", "REIWA", "Doehring", "MRN-47110815"])
    removed = ("PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar")
    assert not [k for k in (*removed, "CommentsOnTheScheduledProcedureStep", "EncryptedAttributesSequence") if k in ds]


def test_an_animal_patients_breed_registration_number_is_removed_and_its_sequence_kept_empty():
    """The registration number names one animal, as a Patient ID does; the sequence is Type 2C for an animal."""
    ds = pydicom.dcmread(CAT)
    registry, registration = Dataset(), Dataset()
    registry.CodeValue, registry.CodingSchemeDesignator, registry.CodeMeaning = "109200", "DCM", "America Kennel Club"
    registration.BreedRegistrationNumber, registration.BreedRegistryCodeSequence = "AKC-WS48213307", [registry]
    ds.BreedRegistrationSequence = [registration]
    ds = _reread(ds)
    deidentify(ds, KEY)
    assert not _leaked(ds, ["WS48213307"])
    assert "BreedRegistrationSequence" in ds and len(ds.BreedRegistrationSequence) == 0


def _with_overlay_in_pixels() -> Dataset:
    """pydicom's overlay example with its overlay moved into bit 12 of the pixels (12 bits stored of 16), as
    systems wrote overlays before Overlay Data was the only place for one."""
    ds = pydicom.dcmread(get_testdata_file("examples_overlay.dcm"))
    ds.PatientID = "MRN-4711"
    overlay = ds.overlay_array(0x6000).astype(np.uint16)
    ds.PixelData = (ds.pixel_array.astype(np.uint16) | overlay << 12).tobytes()
    del ds[0x60003000]
    ds[0x60000100].value, ds[0x60000102].value = 16, 12  # Overlay Bits Allocated, Overlay Bit Position
    return ds


@pytest.mark.parametrize("where", ["overlay_data", "pixel_data"])
def test_an_overlay_in_the_pixel_datas_unused_bits_is_quarantined(where, tmp_path):
    """De-identification removes every overlay attribute and never touches pixels: an overlay held in Overlay Data
    goes with them, one drawn in the pixels' unused bits stayed in the pooled file, unannounced."""
    site = tmp_path / "site"
    site.mkdir()
    ds = _with_overlay_in_pixels() if where == "pixel_data" else pydicom.dcmread(get_testdata_file("examples_overlay.dcm"))
    ds.save_as(site / "IM0001", enforce_file_format=True)
    summary = ingest_site("site_a", site, tmp_path / "pool", key=KEY, progress=False)
    pooled = list((tmp_path / "pool" / "site_a").glob("*.dcm"))
    if where == "pixel_data":
        assert summary.pooled == 0 and not pooled
        assert dict(summary.quarantined) == {"overlay_in_pixel_data": 1}
    else:
        assert summary.pooled == 1
        assert not [e for e in pydicom.dcmread(pooled[0]) if e.tag.group & 0xFF01 == 0x6000]


@pytest.mark.parametrize(
    "file, values, reason",
    [
        ("CT_small.dcm", ["YES", "NO"], "burned_in_annotation"),  # read as one text, "['YES', 'NO']", it passed
        ("CT_small.dcm", ["NO", "YES"], "burned_in_annotation"),
        ("SC_rgb_rle.dcm", ["NO", "NO "], None),  # NO however often: the site reviewed it
        ("SC_rgb_rle.dcm", ["NO", ""], None),
        ("SC_rgb_rle.dcm", ["NO", "MAYBE"], "burned_in_annotation_unknown"),
    ],
)
def test_a_burned_in_annotation_given_several_values_is_judged_by_each(file, values, reason):
    ds = pydicom.dcmread(get_testdata_file(file), stop_before_pixels=True)
    ds.BurnedInAnnotation = values
    found = screen(ds)
    assert (found.reason if found else None) == reason
