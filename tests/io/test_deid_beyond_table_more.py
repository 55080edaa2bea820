"""Attributes Table E.1-1 keeps (it does not list them) that name the site, its systems or its staff. Before, each of
these stayed as written wherever it lay:

- HL7 Instance Identifier (0040,E001): the site's HL7 document as `<OID root>^<document ID>`, in an HL7 Structured
  Document Reference Sequence item (SOP Common, any image) or at the top level (an encapsulated CDA);
- Assigning Facility, Jurisdiction and Agency or Department Code Sequences (0040,0036/0039/003A) outside the Issuer of
  Patient ID Qualifiers Sequence that is removed with them: the agency's or department's codes name the site;
- the coded forms of what the table removes as text, organisations, people and the site's systems and devices, and
  an element of the file meta group inside an item (its AE titles name the site's PACS).

Each is planted at the top level and inside a kept item, in explicit and implicit VR files, and must be in no byte
of the written file (`deid.BEYOND_TABLE`)."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from medtriage.io.deid import deidentify
from medtriage.io.site_key import SiteKey
from tests.io.test_deid_edges import _reread

KEY = SiteKey(b"beyond-table-more-secret-0123456789abcdef")
SITE, HOST, OID = "Saint Elsewhere", "pacs.st-elsewhere.org", "1.3.6.1.4.1.99999.4711"
PERSON, STAFF_ID = "HIBBERT^JULIUS", "EMP-081547"
SYNTAXES = pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
ENCAPSULATED_CDA = "1.2.840.10008.5.1.4.1.1.104.2"


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _leaked(data: bytes, *planted: str) -> list[str]:
    return [value for value in planted if value.encode() in data]


def _code(value: str, meaning: str, scheme: str = "99STELSEW") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _reference(ds: Dataset) -> Dataset:
    """A kept item: a reference to another image of the study."""
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID + ".7"
    return item


def _keywords(ds: Dataset) -> list[str]:
    found = []
    ds.walk(lambda _, elem: found.append(elem.keyword))
    return found


# ---------------------------------------------------------------- HL7 Instance Identifier


def _hl7_reference(document: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ENCAPSULATED_CDA, f"{OID}.1.2"
    item.HL7InstanceIdentifier = f"{OID}^{document}"
    item.RetrieveURI = f"https://{HOST}/cda/{document}"
    return item


@SYNTAXES
def test_hl7_instance_identifiers_are_remapped_as_uids_are(syntax):
    """The site's OID root and document ID go; the identifier stays (Type 1 in the reference item, 1C in an
    encapsulated CDA) as the keyed UID of what it was: a UID alone is an HL7 Instance Identifier without extension, and
    the same document maps to the same value in every object that references it."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.HL7StructuredDocumentReferenceSequence = [_hl7_reference("STELSEW-DOC-4711")]
    ds.HL7InstanceIdentifier = f"{OID}.2"  # top level, the root alone
    nested = _reference(ds)
    nested.HL7StructuredDocumentReferenceSequence = [_hl7_reference("STELSEW-DOC-4711")]
    ds.ReferencedImageSequence = [nested]
    ds = _reread(ds, syntax)
    assert _leaked(_saved(ds), OID, "STELSEW-DOC-4711") == [OID, "STELSEW-DOC-4711"]
    result = deidentify(ds, KEY)
    data = _saved(ds)
    assert _leaked(data, OID, "STELSEW-DOC-4711", HOST) == []
    written = pydicom.dcmread(io.BytesIO(data))
    document = KEY.uid(f"{OID}^STELSEW-DOC-4711")
    for reference in (
        written.HL7StructuredDocumentReferenceSequence[0],
        written.ReferencedImageSequence[0].HL7StructuredDocumentReferenceSequence[0],
    ):
        assert reference.HL7InstanceIdentifier == document and document.startswith("2.25.")
        assert reference.ReferencedSOPInstanceUID == KEY.uid(f"{OID}.1.2")
        assert reference.ReferencedSOPClassUID == ENCAPSULATED_CDA and "RetrieveURI" not in reference
    assert written.HL7InstanceIdentifier == KEY.uid(f"{OID}.2")
    assert result.actions["U"] >= 3


# ---------------------------------------------------------------- assigning facility, jurisdiction, agency


def _assigning(item: Dataset) -> Dataset:
    facility = Dataset()
    facility.LocalNamespaceEntityID = "STELSEWHERE_MPI"
    item.AssigningFacilitySequence = [facility]
    item.AssigningJurisdictionCodeSequence = [_code("US-MA", "Commonwealth of Massachusetts", "ISO3166_2")]
    item.AssigningAgencyOrDepartmentCodeSequence = [_code("STELSEW-RAD", f"{SITE} Radiology Department")]
    return item


ASSIGNING = ("AssigningFacilitySequence", "AssigningJurisdictionCodeSequence", "AssigningAgencyOrDepartmentCodeSequence")


@SYNTAXES
def test_assigning_sequences_go_wherever_a_writer_put_them(syntax):
    """The standard puts them in the Issuer of Patient ID Qualifiers Sequence, which goes with them; one found in the
    data set or a Referenced Request item (the issuer macro flattened into it) still names the site's agency,
    department and jurisdiction, and goes too."""
    ds = _assigning(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    request = _assigning(Dataset())
    request.StudyInstanceUID, request.RequestedProcedureID = ds.StudyInstanceUID, "RP-1"
    ds.ReferencedRequestSequence = [request]
    ds = _reread(ds, syntax)
    planted = ("STELSEW-RAD", f"{SITE} Radiology", "Massachusetts", "STELSEWHERE_MPI")
    assert _leaked(_saved(ds), *planted) == list(planted)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert _leaked(data, *planted) == []
    written = pydicom.dcmread(io.BytesIO(data))
    assert not set(ASSIGNING) & set(_keywords(written))
    assert written.ReferencedRequestSequence[0].StudyInstanceUID == written.StudyInstanceUID  # the item stays


# ---------------------------------------------------------------- the rest of the kept attributes


# keyword, a value naming the site or a person (made afresh for each test), the outcome: gone, emptied or a dummy
KEPT_BEFORE = [
    ("RequestingServiceCodeSequence", lambda: [_code("STELSEW-CARD", f"{SITE} Cardiology")], "X"),
    ("HumanPerformerCodeSequence", lambda: [_code(STAFF_ID, PERSON)], "X"),
    ("CodingSchemeResponsibleOrganization", lambda: f"{SITE} General Hospital, 1 Hospital Road", "X"),
    ("TimeSource", lambda: "STELSEW-NTP1", "X"),
    ("NTPSourceAddress", lambda: f"ntp.{HOST}", "X"),
    ("DeviceID", lambda: "STELSEW-PUMP-4711", "X"),
    ("AcquisitionProtocolName", lambda: f"{SITE} chest protocol of {PERSON}", "D"),
    ("RespiratorySignalSourceID", lambda: "STELSEW-BELT07", "D"),
    ("RadiationMachineName", lambda: "STELSEW-LINAC2", "Z"),
    ("StorageMediaFileSetID", lambda: "STELSEW-ARCH23", "X"),
    ("AuthorizationEquipmentCertificationNumber", lambda: "STELSEW-CERT-0815", "X"),
    ("SOPAuthorizationComment", lambda: f"approved by {PERSON} at {SITE}", "X"),
    ("ContactDisplayName", lambda: f"{PERSON}, {SITE}", "X"),
    ("UniformResourceLocatorTrial", lambda: f"https://{HOST}/wado?patientID=MRN-4711", "X"),
    ("DocumentingOrganizationIdentifierCodeSequenceTrial", lambda: [_code("STELSEW", f"{SITE} General Hospital")], "X"),
    ("DocumentAuthorIdentifierCodeSequenceTrial", lambda: [_code(STAFF_ID, PERSON)], "X"),
    ("DocumentingObserverIdentifierCodeSequenceTrial", lambda: [_code(STAFF_ID, PERSON)], "X"),
]
PLANTED = (SITE, "STELSEW", PERSON, STAFF_ID, HOST)


@SYNTAXES
@pytest.mark.parametrize("keyword, value, action", KEPT_BEFORE, ids=[k for k, _, _ in KEPT_BEFORE])
def test_kept_attributes_that_name_the_site_or_a_person_go(keyword, value, action, syntax):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    setattr(ds, keyword, value())
    nested = _reference(ds)
    setattr(nested, keyword, value())
    ds.ReferencedImageSequence = [nested]
    ds = _reread(ds, syntax)
    assert _leaked(_saved(ds), *PLANTED)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert _leaked(data, *PLANTED) == []
    written = pydicom.dcmread(io.BytesIO(data))
    for where in (written, written.ReferencedImageSequence[0]):
        if action == "X":
            assert keyword not in where
        elif action == "Z":
            assert keyword in where and where[keyword].is_empty  # Type 2: present, empty
        else:
            assert where[keyword].value == "ANONYMIZED"
    assert "ReferencedSOPInstanceUID" in written.ReferencedImageSequence[0]  # the kept item stays


def test_a_file_meta_element_inside_an_item_goes():
    """The file meta group belongs to the file meta (PS3.10 7.1), which is rebuilt: one a writer put inside an item
    was kept, and its AE titles and implementation names the site's PACS and software."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    nested = _reference(ds)
    nested.add_new(0x00020016, "AE", "STELSEW_PACS")  # Source Application Entity Title
    nested.add_new(0x00020013, "SH", "STELSEW_GW_2")  # Implementation Version Name
    ds.ReferencedImageSequence = [nested]
    ds = _reread(ds)
    assert _leaked(_saved(ds), "STELSEW_PACS", "STELSEW_GW_2") == ["STELSEW_PACS", "STELSEW_GW_2"]
    deidentify(ds, KEY)
    data = _saved(ds)
    assert _leaked(data, "STELSEW_PACS", "STELSEW_GW_2") == []
    item = pydicom.dcmread(io.BytesIO(data)).ReferencedImageSequence[0]
    assert [elem.tag >> 16 for elem in item] == [0x0008, 0x0008]
