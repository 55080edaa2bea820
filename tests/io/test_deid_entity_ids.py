"""Local Namespace Entity ID (0040,0031), Universal Entity ID (0040,0032) and Universal Entity ID Type (0040,0033): the
HL7v2 Hierarchic Designator that says which system issued an identifier, by the site's own namespace name and a DNS name,
URI or OID of its server. Table E.1-1 does not list them; every sequence the standard puts them in goes (the issuers of
a Patient ID, an accession number, orders, an admission, a service episode, a container, a specimen; the Assigning
Facility Sequence inside the first), yet they were kept wherever a writer put them in a kept item or data set (the macro
written straight into a Referenced Request Sequence or Specimen Description Sequence item, an Assigning Facility
Sequence outside its issuer, the data set itself). They name the site's systems wherever they lie, and go, as the issuer
sequences do (`deid.BEYOND_TABLE`)."""

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

KEY = SiteKey(b"entity-ids-secret-0123456789abcdef")
HOST, NAMESPACE = "ris.st-elsewhere.org", "STELSEWHERE_RIS"
ENTITY_KEYWORDS = ("LocalNamespaceEntityID", "UniversalEntityID", "UniversalEntityIDType")


def _designator(item: Dataset, kind: str = "DNS") -> Dataset:
    """The HL7v2 Hierarchic Designator macro's three attributes, naming the site's RIS."""
    item.LocalNamespaceEntityID = NAMESPACE
    item.UniversalEntityID = HOST if kind == "DNS" else f"https://{HOST}/accession-numbers"
    item.UniversalEntityIDType = kind
    return item


def _with_designators() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    _designator(ds)  # in the data set itself
    request = _designator(Dataset(), "URI")  # straight into a kept item, beside what it issued
    request.StudyInstanceUID, request.AccessionNumber = ds.StudyInstanceUID, "ACC-1"
    request.IssuerOfAccessionNumberSequence = [_designator(Dataset())]  # where the standard puts it
    ds.ReferencedRequestSequence = [request]
    ds.AssigningFacilitySequence = [_designator(Dataset())]  # outside its Issuer of Patient ID Qualifiers Sequence
    qualifiers = Dataset()
    qualifiers.AssigningFacilitySequence = [_designator(Dataset())]
    ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    specimen = _designator(Dataset())  # a whole-slide image's specimen, the issuer flattened into it
    specimen.SpecimenIdentifier, specimen.SpecimenUID = "S-1", pydicom.uid.generate_uid()
    specimen.IssuerOfTheSpecimenIdentifierSequence = [_designator(Dataset())]
    ds.SpecimenDescriptionSequence = [specimen]
    return ds


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _entity_ids(ds: Dataset) -> list[str]:
    found = []
    ds.walk(lambda _, elem: found.append(elem.keyword) if elem.keyword in ENTITY_KEYWORDS else None)
    return found


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_entity_ids_go_wherever_they_lie(syntax):
    ds = _reread(_with_designators(), syntax)
    study = str(ds.StudyInstanceUID)
    assert HOST.encode() in _saved(ds)
    result = deidentify(ds, KEY)
    data = _saved(ds)
    assert HOST.encode() not in data and NAMESPACE.encode() not in data
    written = pydicom.dcmread(io.BytesIO(data))
    assert _entity_ids(written) == []
    assert result.actions["X"] >= 9  # three in the data set, three in the request item, three in the specimen item
    request = written.ReferencedRequestSequence[0]  # the kept items stay, with what they hold besides
    assert request.StudyInstanceUID == written.StudyInstanceUID == KEY.uid(study)
    assert "IssuerOfAccessionNumberSequence" not in request and "IssuerOfPatientIDQualifiersSequence" not in written
    specimen = written.SpecimenDescriptionSequence[0]
    assert "SpecimenUID" in specimen and not specimen.get("IssuerOfTheSpecimenIdentifierSequence")


def test_an_entity_id_a_writer_gave_another_vr_goes_too():
    """The attribute says what it is, whatever VR a writer gave it (UN for one it did not know)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add(pydicom.DataElement(0x00400032, "UN", HOST.encode()))
    ds.add(pydicom.DataElement(0x00400031, "LO", NAMESPACE))
    ds = _reread(ds)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert HOST.encode() not in data and NAMESPACE.encode() not in data
