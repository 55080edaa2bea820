"""DICOM de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile,
with the Retain Longitudinal Temporal Information with Modified Dates and the Retain Patient
Characteristics options.

Table E.1-1 (attribute -> action) comes from `dicom-anonymizer` (Kitware), whose tables are
generated from the published standard, one module per edition; this module only decides how to
apply them. Identity is replaced with values keyed by a secret the site keeps (`SiteKey`):
HMAC-SHA256 pseudonyms, a per-patient date shift and `2.25.<int>` UIDs, so the same patient,
study or referenced instance maps to the same value on every run, and nothing can be reversed
without the secret. UIDs that name a kind of object, not an instance (SOP classes, a vendor's
private ones included, transfer syntaxes, coding schemes), keep their value. One of the remapped
UIDs found in a value kept elsewhere (copied into an attribute the table does not list or into a
class attribute, written with another VR, or quoted in free text) is remapped as that UID is, or its
element goes where the new UID would not fit. So is any other UID that kept text quotes (another
file's study or object in a WADO URL copied into a note), with the same key: it becomes what that
file's own UID becomes, and references hold across the pool. A token counts as one when it has UID
syntax (PS3.5 9.1, at most 64 characters) under root 0, 1 or 2, three components and 16 characters at
least (no version such as 3.14.2, no IPv4 address), and names no kind: neither a UID the DICOM
standard registers nor one under HL7's code systems 2.16.840.1.113883.6 (anyone can append to the
DICOM root 1.2.840.10008, so the root alone says nothing). A vendor's class quoted in text is remapped
too (text does not say what a UID names); its class attribute keeps it. All private elements are
removed, and so are a few identifying attributes the table does not list (`BEYOND_TABLE`), addresses
(VR UR: a Retrieve URL names the site's server, and the pool has none), an ICC profile's text, device names and
dates (`medtriage.io.icc_profile` rebuilds it from its colour transform), any sequence a writer encoded
with another VR (its items, read as bytes, could not be cleaned), an image inside an item, and native
pixel data's bytes past its frames. Pixel values are never
touched, which is why `medtriage.io.quarantine.screen` sends objects that may carry identity in their pixels or
in free text to quarantine instead, and ingest an overlay drawn in the pixels' unused bits. What a compressed
frame holds beside its pixels (JPEG comment and application segments, JPEG 2000 comments, JP2 metadata boxes) is
removed (`medtriage.io.stream_metadata`), the coded image data kept byte for byte.

numpy/pydicom only: sites install the base package.
"""

from __future__ import annotations

import importlib
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medtriage import __version__
from medtriage.errors import ConfigError, InputError
from medtriage.io.encapsulation import MalformedItems
from medtriage.io.icc_profile import cleaned_profile
from medtriage.io.site_key import SiteKey, is_registered_uid
from medtriage.io.stream_metadata import DamagedFrame, FramesUnknown, Stripped, stripped_pixel_data, unwalked_stream

TABLE_MODULE = "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
TABLE_EDITION = "DICOM PS3.15 2026c Table E.1-1"
IMPLEMENTATION_CLASS_UID = UID("2.25.181688840838635753810091347964069651856")  # medtriage's own
IMPLEMENTATION_VERSION_NAME = f"MEDTRIAGE_{__version__.replace('.', '')}"[:16]
EXPLICIT_LITTLE = (False, True)  # (implicit VR, little endian): how nearly every file is encoded
# The transfer syntax of each encoding pydicom can read a data set in (implicit VR big endian is none).
SYNTAX_OF_ENCODING = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
REEXPORT = "re-export it from the modality/PACS"
NO_SOP_CLASS = f"no SOP Class UID (0008,0016): not a DICOM object ingest can pool; {REEXPORT}"
NO_SOP_INSTANCE = f"no SOP Instance UID (0008,0018): not a DICOM object ingest can pool; {REEXPORT}"
NO_TRANSFER_SYNTAX = (
    "no Transfer Syntax UID (0002,0010) in the file meta, and compressed pixel data that does not say its codec; " + REEXPORT
)

# dicom-anonymizer's category name -> Table E.1-1 action code.
_TABLE_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
# A compound action depends on the attribute's Type in the IOD, which a generic tool cannot know.
# Take the end that is conformant for every Type it covers and never keeps the value: D wherever D is
# offered (a dummy keeps Type 1 attributes valid, such as Device Serial Number in Enhanced General
# Equipment), else Z (Type 2), and U* = keep the references, remap UIDs.
RESOLVED_ACTION = {
    "D": "D",
    "Z": "Z",
    "X": "X",
    "U": "U",
    "K": "K",
    "C": "D",
    "Z/D": "D",
    "X/Z": "Z",
    "X/D": "D",
    "X/Z/D": "D",
    "X/Z/U*": "U*",
}

# Retain Patient Characteristics Option: attributes the option marks K (those marked C are free
# text that cannot be cleaned automatically, so they keep the basic-profile action).
PATIENT_CHARACTERISTICS = (
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "SmokingStatus",
    "PregnancyStatus",
    "PatientSexNeutered",
)
DEFAULT_CHARACTERISTICS = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight")
# Dates the Modified Dates option does not keep: the birth date would identify; age is retained instead.
NEVER_SHIFTED = frozenset(tag_for_keyword(k) for k in ("PatientBirthDate", "PatientBirthTime"))
# Identifying attributes Table E.1-1 does not list, which PS3.15 E.1.1 leaves to the de-identifier: a birth or death
# date in another calendar is the date itself (LO, so no date rule sees it), a breed registration number names one
# animal as a Patient ID does, the scheduled step's comments are free text on the patient (the table removes those of
# the requested and performed steps), and an earlier de-identifier's encrypted original attributes give the identity
# back to whoever holds its key. The sequences saying who issued a Patient ID, an accession number or an order name the
# site's systems and addresses (the table removes Issuer of Patient ID and the order numbers), and so does the HL7v2
# Hierarchic Designator they hold (the site's namespace, the DNS name, URI or OID of its server), wherever a writer put
# it: every sequence the standard puts it in goes (these, and the issuers of an admission, a service episode, a container
# and a specimen, which the table removes or empties), so a kept one lies in an item the standard does not put it in (a
# Referenced Request or Specimen Description item, an Assigning Facility Sequence outside its issuer). A site's own coding
# scheme names the site as its responsible organisation, and a content item's Text Value is free text wherever the item
# lies (a protocol context's too, which no listed sequence holds). An ICC profile carries text too (its description,
# copyright, device descriptions, private tags, the header's device, creator and date): it is cleaned (C, as Table E.1-1
# names the action), rebuilt from its colour transform alone (`medtriage.io.icc_profile`), wherever it lies (the Optical
# Path Sequence of a whole-slide image holds one per optical path). The issuer macro's Assigning Facility, Jurisdiction and
# Agency or Department go wherever they lie, as its Hierarchic Designator does, and so do the coded forms of what the
# table removes as text (a requesting service, a performing person), the department or service responsible (the
# Responsible Group Code Sequence: its meanings are free text, its scheme may be the site's own), the user a hanging
# protocol is for and who made it, the site's HL7 documents (an HL7 Instance Identifier is `<the site's OID>^<document
# ID>`: remapped as a UID is, which keeps it valid and references consistent),
# and the site's staff, systems and devices where the table does not list them: the Retain Device Identity Option does
# not apply (`DeidOptions`), so a respiratory signal's device and an RT image's machine go as Gantry ID and Treatment
# Machine Name do (manufacturers and models stay: they name a vendor, not the site, and the table keeps them).
BEYOND_TABLE = {
    tag_for_keyword(keyword): action
    for keyword, action in (
        ("PatientBirthDateInAlternativeCalendar", "X"),
        ("PatientDeathDateInAlternativeCalendar", "X"),
        ("PatientAlternativeCalendar", "X"),  # Type 1C: present only with one of the two dates
        ("BreedRegistrationSequence", "Z"),  # Type 2C for an animal: stays, empty
        ("CommentsOnTheScheduledProcedureStep", "X"),
        ("EncryptedAttributesSequence", "X"),
        ("IssuerOfPatientIDQualifiersSequence", "X"),
        ("IssuerOfAccessionNumberSequence", "X"),
        ("OrderPlacerIdentifierSequence", "X"),
        ("OrderFillerIdentifierSequence", "X"),
        ("LocalNamespaceEntityID", "X"),  # the HL7v2 Hierarchic Designator, Type 1C inside the sequences above
        ("UniversalEntityID", "X"),
        ("UniversalEntityIDType", "X"),  # says what kind the removed Universal Entity ID was (DNS, URI, ISO...)
        ("CodingSchemeIdentificationSequence", "X"),  # Type 3: codes keep their designators
        ("TextValue", "D"),  # Type 1C in a TEXT item: a dummy keeps it valid, as Unformatted Text Value's D does
        ("ICCProfile", "C"),  # Type 1C for colour in an optical path, 1 in the ICC Profile Module: see clean_icc_profile
        ("HL7InstanceIdentifier", "U"),  # Type 1 in an HL7 Structured Document Reference item: a UID alone is a valid one
        ("AssigningFacilitySequence", "X"),  # Type 3 in the issuer's qualifiers: the site's facility, by its designator
        ("AssigningJurisdictionCodeSequence", "X"),  # Type 3 there: the state or country the site lies in
        ("AssigningAgencyOrDepartmentCodeSequence", "X"),  # Type 3 there: codes of the site's agency or department
        ("RequestingServiceCodeSequence", "X"),  # Type 3: the requesting department as codes; Requesting Service is X
        ("ResponsibleGroupCodeSequence", "X"),  # the department or service responsible, as codes: as Requesting Service's
        ("HumanPerformerCodeSequence", "X"),  # codes naming a person; the Human Performers sequences holding it are X
        ("CodingSchemeResponsibleOrganization", "X"),  # an organisation and its contact details; its sequence goes
        ("TimeSource", "X"),  # Type 3: the ID of the site's equipment or system giving the time
        ("NTPSourceAddress", "X"),  # Type 3: the IP address or host name of the site's time server
        ("DeviceID", "X"),  # Type 3 in the Device Sequence: the site's own identifier of a device (Retain Device Identity: no)
        ("AcquisitionProtocolName", "D"),  # free text, as Protocol Name (X/D) and Acquisition Protocol Description (X)
        ("RespiratorySignalSourceID", "D"),  # the ID of the device giving the respiratory signal: a dummy, as Detector ID's
        ("RadiationMachineName", "Z"),  # Type 2 in the RT Image Module: the site's machine, as Treatment Machine Name (X/Z)
        ("StorageMediaFileSetID", "X"),  # Type 3: the site's name for its media; the table remaps the File-set UID
        ("AuthorizationEquipmentCertificationNumber", "X"),  # Type 3: the site's system that authorised the instance
        ("SOPAuthorizationComment", "X"),  # Type 3: free text by whoever authorised it; the table removes its date
        ("ContactDisplayName", "X"),  # Type 3: the person or organisation named beside a Contact URI (an address, gone)
        ("UniformResourceLocatorTrial", "X"),  # retired: an address written as ST, as addresses of VR UR go
        ("DocumentingOrganizationIdentifierCodeSequenceTrial", "X"),  # retired: an organisation, as Verifying Organization
        ("DocumentAuthorIdentifierCodeSequenceTrial", "X"),  # retired: a person, as the Author Observer Sequence (X)
        ("DocumentingObserverIdentifierCodeSequenceTrial", "X"),  # retired: a person, as Verifying Observer Identification
        ("HangingProtocolUserIdentificationCodeSequence", "Z"),  # Type 2: the user (a person) it is for, as codes
        ("HangingProtocolCreator", "D"),  # Type 1: the person or group who made it, as Operators' Name (X/Z/D)
        ("HangingProtocolUserGroupName", "X"),  # Type 3: the site's group of users it is for
    )
}
# Addresses (VR UR: Retrieve URL and URI, Storage URL, Pixel Data Provider URL, file, folder and contact URIs, presentation
# addresses...) name the site's servers, and a query may carry a Patient ID, while the pool reaches none of them: any
# the table does not list goes, by the VR of the attribute or of the file (a future attribute too; private and unknown
# ones go as all such elements do). A URN Code Value goes with them: a code given as a URL may name the site's server
# as a site's own coding scheme does. Where the table lists one (Selector UR Value: D), its action stays.
ADDRESS_VR = "UR"
# An image inside an item: the table removes the Icon Image Sequence, the one place the standard puts one; elsewhere its
# pixels would be pooled unscreened (Burned In Annotation speaks for the object's own pixels only).
NESTED_PIXEL_TAGS = frozenset(tag_for_keyword(k) for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
ANIMAL_OWNER_ATTRIBUTES = ("ResponsiblePerson", "ResponsibleOrganization")  # Type 2C: required if the patient is an animal
PSEUDONYM_TAGS = frozenset(tag_for_keyword(k) for k in ("PatientID", "PatientName"))
# UIDs that name a kind of thing, not a patient, study or instance: SOP classes (a vendor's private ones too, which a
# viewer must still recognise), transfer syntaxes, context groups, coding schemes and mapping resources. Table E.1-1
# lists none of them. Extension creators name an organisation (the table remaps the template ones), implementations
# and devices a site's software or machine: these are not kinds, and stay remapped.
KIND_UID_TAGS = frozenset(
    tag_for_keyword(k)
    for k in (
        "MediaStorageSOPClassUID",
        "TransferSyntaxUID",
        "RTVCommunicationSOPClassUID",
        "ReferencedSOPClassUIDInFile",
        "ReferencedTransferSyntaxUIDInFile",
        "ReferencedRelatedGeneralSOPClassUIDInFile",
        "SOPClassUID",
        "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID",
        "SOPClassesInStudy",
        "CodingSchemeUID",
        "ContextUID",
        "MappingResourceUID",
        "StoredInstanceTransferSyntaxUID",
        "ReferencedSOPClassUID",
        "SOPClassesSupported",
        "AvailableTransferSyntaxUID",
        "FlowTransferSyntaxUID",
        "MACCalculationTransferSyntaxUID",
        "EncryptedContentTransferSyntaxUID",
        "PertinentSOPClassesInStudy",
        "PertinentSOPClassesInSeries",
    )
)
KEEP_KIND = "N"  # the walker's action for them: the value stays as read, wherever it occurs, unless it is one of the
# data set's own instance UIDs (a writer that swapped class and instance in a reference): that one maps as it does
UID_TEXT = re.compile(r"[0-9.\\\0 ]*")  # UID syntax (PS3.5 9.1), several values and padding: no room for a name
# A remapped UID that other values are compared with: three components at least, so that no number is taken for one.
OWN_UID = re.compile(r"[0-9]+(?:\.[0-9]+){2,}")
# How text can quote one: a longest run of digits and dots, so that a UID is never found inside a longer one, yet the
# full stop after it that ends a sentence is not taken for part of it.
UID_TOKEN = re.compile(r"[0-9]+(?:\.[0-9]+)*")
# Such a token taken for an instance UID of another data set (a reference in a comment): UID syntax (PS3.5
# 9.1: no component with a leading zero but "0" itself, 64 characters at most) under one of the three roots every OID has,
# three components at least, and 16 characters at least, as an organisation's root and the instance's own components
# are: a version ("3.14.2") or a dotted IPv4 address (15 at most) is shorter.
QUOTED_UID = re.compile(r"(?=[0-9.]{16,64}\Z)[0-2](?:\.(?:0|[1-9][0-9]*)){2,}")
# Where a quoted UID names a kind of thing, never an instance, beside the UIDs the DICOM standard registers (classes,
# transfer syntaxes, coding schemes...: `is_registered_uid`): HL7's external code systems (SNOMED CT, LOINC, UCUM...).
KIND_ROOTS = ("2.16.840.1.113883.6.",)
# Where such a UID can take its replacement, with the most characters a value may then have (PS3.5 6.2; LO and UI
# per value, the others have one): the element goes where the VR is not listed or its value would grow past that.
UID_HOLDING_VRS = {"LO": 64, "UI": 64, "LT": 10240, "ST": 1024, "UT": None, "UC": None, "UR": None, "OB": None, "UN": None}
# One value each: longer than 64 bytes, not text, unless the attribute is text a writer encoded as bulk data.
BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
# Z allows "a dummy value consistent with the VR": a keyed one keeps accession-keyed labels joinable.
ACCESSION_TAG = tag_for_keyword("AccessionNumber")
# What systems write into Patient's Name (or Patient ID) when they know no name (compared upper-case, name components
# joined by spaces). Without a Patient ID the name is the identity, and such a value would make one patient of everyone
# who has it, so it counts as no name at all; a name of only carets and spaces is empty the same way.
PLACEHOLDER_NAMES = frozenset(
    {
        "ANONYMOUS",
        "ANONYMIZED",
        "ANON",
        "UNKNOWN",
        "UNK",
        "NONE",
        "NULL",
        "N/A",
        "NA",
        "TEST",
        "TEST PATIENT",
        "NO NAME",
        "NONAME",
        "PATIENT",
    }
)
NO_PATIENT_IDENTITY = "no Patient ID and no Patient's Name, or only placeholder ones (such as ANONYMOUS)"

# CID 7050 De-identification Method codes.
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
# PS3.16 CID 7050 (De-identification Method): the codes an earlier de-identifier may have recorded, with their meanings
METHOD_CODE_MEANINGS = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113102": "Clean Recognizable Visual Features Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113110": "Retain UIDs Option",
    "113111": "Retain Safe Private Option",
    "113112": "Retain Institution Identity Option",
}

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000D",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
    "OB": b"\0\0",
    "OW": b"\0\0",
    "OF": b"\0\0\0\0",
    "OD": b"\0" * 8,
    "OL": b"\0\0\0\0",
    "OV": b"\0" * 8,
    "UN": b"\0\0",
}


# ---------------------------------------------------------------- Table E.1-1


@dataclass(frozen=True)
class ProfileTable:
    """Table E.1-1 as a lookup: exact tags, plus masked ones for repeating groups (curves, overlays)."""

    exact: dict[int, str]
    masked: tuple[tuple[int, int, str], ...]  # (value, mask, action) on the 32-bit tag

    def action(self, tag: int) -> str | None:
        found = self.exact.get(int(tag))
        if found is None:
            found = next((a for value, mask, a in self.masked if int(tag) & mask == value), None)
        return found


@lru_cache(maxsize=1)
def profile_table() -> ProfileTable:
    table = importlib.import_module(TABLE_MODULE)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for category, action in _TABLE_CATEGORIES.items():
        for entry in getattr(table, category):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:  # (group, element, group mask, element mask)
                group, element, group_mask, element_mask = entry
                masked.append(((group << 16) | element, (group_mask << 16) | element_mask, action))
    return ProfileTable(exact, tuple(masked))


@lru_cache(maxsize=1)
def table_library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"dicom-anonymizer {version('dicom-anonymizer')}"
    except PackageNotFoundError:
        return "dicom-anonymizer (version unknown)"


# ---------------------------------------------------------------- applying the profile


SEVERAL_ISSUERS_IDENTITY = "Issuer of Patient ID + Patient ID"  # how patients are keyed with several_id_issuers


@dataclass(frozen=True)
class DeidOptions:
    """Which options of the profile apply, and which characteristics a pool retains."""

    modified_dates: bool = True
    retain_characteristics: tuple[str, ...] = DEFAULT_CHARACTERISTICS
    # One Patient ID is one patient, whatever Issuer of Patient ID says (a site that fills the issuer on some
    # modalities only would split a patient, and possibly across splits). A site whose IDs come from several
    # issuing systems, where one ID can name two patients, sets this to key the patient on issuer and ID.
    several_id_issuers: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.retain_characteristics) - set(PATIENT_CHARACTERISTICS))
        if unknown:
            raise ConfigError(f"cannot retain {unknown}: the option covers only {list(PATIENT_CHARACTERISTICS)}")

    def method_codes(self) -> list[tuple[str, str]]:
        codes = [CODE_BASIC]
        if self.modified_dates:
            codes.append(CODE_MODIFIED_DATES)
        if self.retain_characteristics:
            codes.append(CODE_PATIENT_CHARACTERISTICS)
        return codes

    def describe(self) -> dict:
        return {
            "profile": "PS3.15 Annex E Basic Application Level Confidentiality Profile",
            "table": TABLE_EDITION,
            "table_source": table_library_version(),
            "options": [meaning for _, meaning in self.method_codes()[1:]],
            "retained_characteristics": list(self.retain_characteristics),
            "private_elements": "removed",
            "addresses": "removed (VR UR)",
            "icc_profiles": "rebuilt from their colour transform (no text, device, date or unread bytes); removed where unreadable",
            "uids": "2.25 + keyed hash, those quoted in kept text too; class, transfer syntax and coding scheme UIDs kept",
            "patient_id": "keyed pseudonym",
            "patient_identity": SEVERAL_ISSUERS_IDENTITY if self.several_id_issuers else "Patient ID (issuer ignored)",
        }


@dataclass
class DeidResult:
    pseudonym: str
    date_shift_days: int
    sop_uid: str
    study_uid: str
    series_uid: str
    actions: Counter = field(default_factory=Counter)
    identified_by_name: bool = False  # no Patient ID: the patient is known by name and birth date only
    stream_metadata: Counter = field(default_factory=Counter)  # removed from compressed frames, by kind (COM, APP1...)


def patient_id_text(value) -> str:
    """A Patient ID (LO) as identity: leading and trailing spaces are padding, not part of the value (PS3.5 6.2),
    so ' 123 ' and '123' are one patient; case is kept (LO is case-sensitive)."""
    return "" if value is None else str(value).strip()


def identifying_patient_id(ds: Dataset) -> str:
    """The file's Patient ID as identity; empty where it has none, or only a placeholder (ANONYMOUS, UNKNOWN, 0000...):
    as a placeholder name, such an ID would make one patient of everyone who has it, so the name identifies them."""
    pid = patient_id_text(ds.get("PatientID", ""))
    return "" if pid.upper() in PLACEHOLDER_NAMES or not pid.strip("0-*?.") else pid


def is_placeholder_name(name: str) -> bool:
    """A Patient's Name that names nobody: empty, only carets and spaces, or one of PLACEHOLDER_NAMES."""
    words = " ".join(name.replace("^", " ").replace("=", " ").split()).upper()
    return not words or words in PLACEHOLDER_NAMES


def patient_key(ds: Dataset, options: DeidOptions = DeidOptions()) -> str | None:
    """What identifies the patient at the site; None when the file names nobody (no Patient ID or a placeholder one,
    and no name or a placeholder one). The issuer joins the key only for a site with several; '|<id>' is the key either way without one."""
    pid = identifying_patient_id(ds)
    if pid:
        issuer = patient_id_text(ds.get("IssuerOfPatientID", "")) if options.several_id_issuers else ""
        return f"{issuer}|{pid}"
    name, birth = str(ds.get("PatientName", "") or "").strip(), str(ds.get("PatientBirthDate", "") or "").strip()
    return None if is_placeholder_name(name) else f"name|{name}|{birth}"


def deidentify(ds: Dataset, key: SiteKey, options: DeidOptions = DeidOptions()) -> DeidResult:
    """De-identify `ds` in place (file meta included). Raises ConfigError if the patient is unnamed, InputError if
    `ds` lacks what its file meta is made of (`not_deidentifiable`), its pixel data is in a syntax whose stream is not
    walked (`stream_metadata.unwalked_stream`), or a compressed frame cannot be walked to the metadata it may carry
    (`stream_metadata.DamagedFrame`)."""
    patient = patient_key(ds, options)
    if patient is None:
        raise ConfigError(f"{NO_PATIENT_IDENTITY}: the file cannot be linked to a patient pseudonym")
    if problem := not_deidentifiable(ds) or unwalked_stream(ds, transfer_syntax(ds)):  # screened at ingest; any caller
        raise InputError(problem)
    stripped = _without_stream_metadata(ds)  # before anything changes: a damaged frame leaves `ds` as it was
    by_name = not identifying_patient_id(ds)
    walker = _ProfileWalker(key, options, key.pseudonym(patient), key.date_shift_days(patient))
    stored_as = (getattr(ds, "file_meta", None) or Dataset()).get("MediaStorageSOPInstanceUID", "")
    walker.remap_uid(str(stored_as))  # an own UID, though only the file meta held it: kept text may quote it
    walker.apply(ds, top_level=True)
    walker.replace_quoted_uids()
    _set_pixel_data(ds, stripped)
    _without_bytes_past_the_frames(ds)
    _keep_animal_owner_attributes(ds)
    _mark_deidentified(ds, options)
    _rebuild_file_meta(ds)
    ds.preamble = b"\0" * 128  # a preamble may hold anything (dual-format TIFF headers, vendor text)
    return DeidResult(
        walker.pseudonym,
        walker.shift_days,
        str(ds.SOPInstanceUID),
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("SeriesInstanceUID", "")),
        walker.actions,
        by_name,
        stripped.removed if stripped else Counter(),
    )


def not_deidentifiable(ds: Dataset) -> str | None:
    """Why no de-identified file can be written of `ds` (no class or instance UID, no known transfer syntax), or None."""
    if not ds.get("SOPClassUID"):
        return NO_SOP_CLASS
    if not ds.get("SOPInstanceUID"):
        return NO_SOP_INSTANCE
    return None if transfer_syntax(ds) else NO_TRANSFER_SYNTAX


def _without_stream_metadata(ds: Dataset) -> Stripped | None:
    """The pixel data without the metadata its compressed frames carry; None where they carry none."""
    try:
        return stripped_pixel_data(ds, transfer_syntax(ds))
    except (DamagedFrame, MalformedItems, FramesUnknown) as err:
        raise InputError(f"compressed pixel data that cannot be de-identified: {err}") from None


def _set_pixel_data(ds: Dataset, stripped: Stripped | None) -> None:
    if stripped is None:
        return
    ds.PixelData = stripped.pixel_data
    ds["PixelData"].is_undefined_length = True  # encapsulated
    if stripped.extended is not None:
        ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = stripped.extended
    else:  # a table the decoders ignore (its halves differ in size) would now point at other bytes
        for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
            if keyword in ds:
                delattr(ds, keyword)


def _without_bytes_past_the_frames(ds: Dataset) -> None:
    """Native Pixel Data holds the frames its header describes, padded to even length: no decoder reads the bytes past
    them, which may hold anything, so they go (a pad byte becomes a null). The pixels stay byte for byte."""
    if "PixelData" not in ds or ds["PixelData"].is_undefined_length:
        return  # none, or encapsulated: its frames are walked (`stream_metadata`)
    sizes = [ds.get(k) for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")] + [ds.get("NumberOfFrames") or 1]
    if not all(isinstance(v, int) and v > 0 for v in sizes) or (sizes[3] % 8 and sizes[3] != 1):
        return  # a length its header does not give (ingest quarantines those), or packed samples pydicom does not count
    try:
        needed = get_expected_length(ds, "bytes")
    except (AttributeError, KeyError, TypeError, ValueError):
        return
    data = ds.PixelData
    if len(data) > needed + needed % 2:
        ds.PixelData = data[:needed] + b"\0" * (needed % 2)


def transfer_syntax(ds: Dataset) -> UID | None:
    """The file meta's Transfer Syntax UID; without one, the syntax of the encoding pydicom guessed and read the data
    set in, unless the pixel data is compressed (the encoding does not say the codec). None where neither tells."""
    syntax = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if syntax:
        return syntax
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        return None
    return SYNTAX_OF_ENCODING.get(ds.original_encoding)


def _keep_animal_owner_attributes(ds: Dataset) -> None:
    """Responsible Person and Responsible Organization are X in the table, yet Type 2C (present, maybe empty) when the
    patient is an animal (PS3.3 C.7.1.1): for an animal they stay, empty (Z), so that the object stays valid."""
    if "PatientSpeciesDescription" in ds or "PatientSpeciesCodeSequence" in ds:
        for keyword in ANIMAL_OWNER_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")


_DECISIONS: dict[DeidOptions, dict] = {}


class _ProfileWalker:
    """Applies one action per element, recursing into sequences so references stay consistent."""

    def __init__(self, key: SiteKey, options: DeidOptions, pseudonym: str, shift_days: int):
        self.key, self.options, self.table = key, options, profile_table()
        self.pseudonym, self.shift_days = pseudonym, shift_days
        self.retained = frozenset(tag_for_keyword(k) for k in options.retain_characteristics)
        self.decisions = _DECISIONS.setdefault(options, {})  # depends on the options and the table only
        self.actions: Counter = Counter()
        self.remapped: set[str] = set()  # original UIDs this data set's remapping replaced
        self.kept: list[tuple[Dataset, int, str]] = []  # elements kept as read, with the action counted: any may hold one

    def apply(self, ds: Dataset, top_level: bool = False) -> None:
        decisions, actions = self.decisions, self.actions
        for tag in list(ds.keys()):
            elem = ds.get_item(tag)  # still undecoded bytes if nobody looked: keep it that way when kept
            vr = elem.VR if elem.VR not in (None, "UN") else None  # implicit VR files carry none
            action = decisions.get((int(tag), vr, top_level)) or self.action_for(int(tag), vr, top_level)
            if action == KEEP_KIND and not _is_uid_text(elem):
                action = "U"  # not a UID (text, or items): it may name anyone, and goes as unlisted UIDs do
            actions[action] += 1
            if (action == "K" and vr not in ("SQ", "UI", None)) or action == KEEP_KIND:
                self.kept.append((ds, tag, action))  # a class attribute too: a writer may have put an instance UID there
                continue  # the common case: kept as read, raw bytes or decoded alike
            if action == "X":
                del ds[tag]
            elif elem.is_raw and vr is not None and self.edits_raw(action, vr):
                ds[tag] = self.edit_raw(elem, action)
            else:
                self.perform(ds, ds[tag], action)

    @staticmethod
    def edits_raw(action: str, vr: str) -> bool:
        """Actions whose new value can be written straight into the element's bytes: emptying, and the
        ASCII-only values of pseudonyms, remapped UIDs and shifted dates. The rest is never decoded."""
        return (
            (action == "Z" and vr != "SQ")
            or (action == "P" and vr in ("PN", "LO"))
            or (vr == "UI" and action in ("U", "U*", "K"))
            or (action == "S" and vr in ("DA", "DT"))
        )

    def edit_raw(self, raw: RawDataElement, action: str) -> RawDataElement:
        """The same element with its new value encoded as pydicom would write it (padded to even length)."""
        if action == "Z":
            return raw._replace(value=b"", length=0)
        if action == "P":
            return _with_text(raw, self.pseudonym, " ")
        text = raw.value.decode(default_encoding).rstrip(" \0")  # as pydicom decodes these VRs
        if not text:
            return raw
        if raw.VR == "UI":
            fn, padding = self.remap_uid, "\0"
        else:
            fn, padding = (self.shift_date if raw.VR == "DA" else self.shift_datetime), " "
        return _with_text(raw, "\\".join(fn(value) for value in text.split("\\")), padding)

    def action_for(self, tag: int, vr: str | None, top_level: bool) -> str:
        found = self.decisions.get((tag, vr, top_level))
        if found is None:
            found = self.decisions[(tag, vr, top_level)] = self._decide(tag, vr, top_level)
        return found

    def _decide(self, tag: int, vr: str | None, top_level: bool) -> str:
        if (tag >> 16) & 1 or tag & 0xFFFF == 0 or not (dictionary_has_tag(tag) or self.table.action(tag)):
            return "X"  # private, group lengths (retired, would go stale) and unknown public elements
        if tag >> 16 == 0:
            return "X"  # a command set stored with the object: part of a message, never of a file (PS3.5 7.1)
        if tag >> 16 == 2:
            return "X"  # the file meta group in the data set or an item (PS3.10 7.1): AE titles of the site's systems
        if not top_level and tag in NESTED_PIXEL_TAGS:
            return "X"
        known = _attribute_vr(tag)
        if known == "SQ" and vr not in (None, "SQ"):
            return "X"  # items written as bytes or text are no data sets to walk: nothing inside them would be cleaned
        if tag in BEYOND_TABLE:
            return BEYOND_TABLE[tag]
        # The VR the attribute has and the one the file gave it (writers get it wrong): either says UID, name or date.
        vrs = {vr or known, known}
        if tag in self.retained:
            return "K"
        if top_level and tag in PSEUDONYM_TAGS:
            return "P"
        if top_level and tag == ACCESSION_TAG:
            return "A"
        if self.options.modified_dates and tag not in NEVER_SHIFTED:
            if vrs & {"DA", "DT"}:
                return "S"
            if vrs == {"TM"}:
                return "K"  # whole-day shifts keep times consistent with the shifted dates
        listed = self.table.action(tag)
        if listed is not None:
            return RESOLVED_ACTION[listed]
        if "UI" in vrs:  # UIDs the table does not list (e.g. inside references) are remapped too, kinds aside
            return KEEP_KIND if tag in KIND_UID_TAGS else "U"
        if "PN" in vrs:
            return "Z"  # a person's name the table does not list is still a name
        if vrs & {"DA", "DT"}:
            return "Z"  # dates not shifted are removed, listed or not: the object says its dates were (REMOVED)
        if ADDRESS_VR in vrs:
            return "X"  # an address the table does not list: it leads back to the site
        return "K"

    def perform(self, ds: Dataset, elem, action: str) -> None:
        if action == "Z":
            elem.value = Sequence([]) if elem.VR == "SQ" else None
        elif action == "D":
            elem.value = Sequence([]) if elem.VR == "SQ" else self.dummy(elem)
        elif action == "P":
            elem.value = self.pseudonym
        elif action == "A":
            elem.value = self.key.accession(str(elem.value or ""))
        elif action == "S" and not _is_text(elem.value):
            elem.value = None  # a date as bytes (a writer's wrong VR): nothing to shift, and it must not stay
        elif action == "S":
            elem.value = self.map_values(elem.value, self.shift_date if elem.VR == "DA" else self.shift_datetime)
        elif action == "C":
            self.clean_icc_profile(ds, elem)
        elif action in ("U", "U*", "K"):
            if elem.VR == "SQ":
                for item in elem.value or []:
                    self.apply(item)
            elif elem.VR == "UI" or (action == "U" and _is_text(elem.value)):  # a listed UID, whatever VR it was given
                elem.value = self.map_values(elem.value, self.remap_uid)
            elif action == "U" and not elem.is_empty:
                del ds[elem.tag]  # a listed UID as bytes or numbers: no UID to remap, and the original must not stay
            else:
                self.kept.append((ds, elem.tag, action))

    def clean_icc_profile(self, ds: Dataset, elem) -> None:
        """ICC Profile rebuilt from its colour transform alone (`medtriage.io.icc_profile`), or removed where that cannot
        be done: a profile that cannot be read within its bounds (most such a colour manager cannot read either), one of
        another version (iccMAX) or of no image's colour (device link, abstract, named colours), one with no transform
        left, or a value that is not bytes (a writer's text VR). Removing it is acceptable: the pool is for training, on
        stored pixel values that stay byte for byte, and the profile only tells a colour-managed viewer how to show them.
        DICOM does not say that colour pixel data without a profile is sRGB (Color Space (0028,2002) only names the space
        a present profile describes): its colour is then uncharacterised, and viewers show the values as they are, which
        on an sRGB display amounts to sRGB. The object loses conformance where the profile is required (Type 1 in the ICC
        Profile Module, 1C for colour in the Optical Path Sequence), never an identity. An empty value stays empty."""
        value = elem.value
        if value is None or value == b"":
            return
        cleaned = cleaned_profile(value) if isinstance(value, bytes) else None
        if cleaned is None:
            self.actions["C"] -= 1
            self.actions["X"] += 1
            del ds[elem.tag]
        else:
            ds[elem.tag] = DataElement(elem.tag, "OB", cleaned)

    def dummy(self, elem):
        if elem.VR == "UI":
            return self.map_values(elem.value, self.remap_uid)
        if elem.VR in ("DA", "DT") and self.options.modified_dates:
            return self.map_values(elem.value, self.shift_date if elem.VR == "DA" else self.shift_datetime)
        return _DUMMY_BY_VR.get(elem.VR, _DUMMY_TEXT)

    @staticmethod
    def map_values(value, fn):
        if value is None or value == "":
            return value
        if isinstance(value, (list, MultiValue)):
            return [fn(str(v)) for v in value]
        return fn(str(value))

    def remap_uid(self, uid: str) -> str:
        new, original = self.key.uid(uid), uid.strip("\0 ")
        if new != original and OWN_UID.fullmatch(original):
            self.remapped.add(original)
        return new

    def replace_quoted_uids(self) -> None:
        """A kept value holding a UID remapped elsewhere in the data set (an attribute the table does not list, written
        with another VR, or quoted in a comment or an address), or in text another instance's UID (`_names_an_instance`),
        would link the object back to the site's archive: the UID maps as it does there, with the same key, so that
        references stay consistent, or the element goes where the VR cannot hold the new UID. A class attribute keeps
        a UID not its data set's own: it names a kind, a vendor's private class too."""
        for ds, tag, counted in self.kept:
            elem = ds.get_item(tag)
            values = [v.rstrip("\0 ") for v in _text_values(elem)]
            remap = self.remap_own_uid if counted == KEEP_KIND else self.remap_quoted_uid
            new = [UID_TOKEN.sub(remap, v) for v in values]
            if new == values:
                continue
            self.actions[counted] -= 1
            if elem.VR is None:  # kept undecoded from an implicit VR file: the attribute's VR says what it may hold
                elem = ds[tag]
            if not _fits(elem.VR, new):
                self.actions["X"] += 1
                del ds[tag]
                continue
            self.actions["U"] += 1
            padding = "\0" if elem.VR in BULK_VRS or elem.VR == "UI" else " "
            if elem.is_raw:
                ds[tag] = _with_text(elem, "\\".join(new), padding)
            elif isinstance(elem.value, bytes):
                elem.value = _padded("\\".join(new), padding)
            else:
                elem.value = new if len(new) > 1 else new[0]

    def remap_own_uid(self, found: re.Match) -> str:
        return self.remap_uid(found[0]) if found[0] in self.remapped else found[0]

    def remap_quoted_uid(self, found: re.Match) -> str:
        # not `remap_uid`: another instance's UID must not join the data set's own, which class attributes lose too
        token = found[0]
        return self.key.uid(token) if token in self.remapped or _names_an_instance(token) else token

    def shift_date(self, value: str) -> str:
        return _shifted(_parse_date(value), self.shift_days)

    def shift_datetime(self, value: str) -> str:
        # partial datetimes (year or month only) cannot be shifted by days: empty them rather than keep them.
        # A UTC offset (&ZZXX) goes as Timezone Offset From UTC does (X): it says where the site is.
        shifted = _shifted(_parse_date(value[:8]), self.shift_days)
        return shifted + re.split(r"[+-]", value[8:], maxsplit=1)[0] if shifted else ""


def _names_an_instance(token: str) -> bool:
    """Whether a token of kept text is taken for an instance UID: `QUOTED_UID`, under none of the `KIND_ROOTS` and not
    registered (a site's UID under the DICOM root is an instance's like any other, as `SiteKey.uid` maps it)."""
    return bool(QUOTED_UID.fullmatch(token)) and not token.startswith(KIND_ROOTS) and not is_registered_uid(token)


def _is_uid_text(elem) -> bool:
    """Whether the element, decoded or still bytes, holds nothing but UID syntax (so no items either)."""
    value = elem.value
    if isinstance(value, bytes):
        return bool(UID_TEXT.fullmatch(value.decode("latin-1")))
    values = value if isinstance(value, (list, MultiValue)) else [value]
    return all(isinstance(v, str) and UID_TEXT.fullmatch(v) for v in values if v is not None)


def _fits(vr: str, values: list[str]) -> bool:
    """Whether `values` are a valid value of `vr`, one that can hold a UID, by length."""
    if vr not in UID_HOLDING_VRS:
        return False
    limit = UID_HOLDING_VRS[vr]
    return limit is None or all(len(v) <= limit for v in (values if vr in ("LO", "UI") else ["\\".join(values)]))


def _text_values(elem) -> list[str]:
    """The element's values as text, decoded or still bytes; none for numbers, names and bulk data."""
    value = elem.value
    if isinstance(value, bytes):
        bulk = elem.VR in BULK_VRS and len(value) > 64 and _attribute_vr(elem.tag) not in TEXT_VRS
        return [] if bulk else value.decode("latin-1").split("\\")
    values = list(value) if isinstance(value, (list, MultiValue)) else [value]
    return values if all(isinstance(v, str) for v in values) else []


def _attribute_vr(tag: int) -> str:
    return dictionary_VR(tag) if dictionary_has_tag(tag) else "UN"


def _is_text(value) -> bool:
    """A string value, or several: what a UID written with a text VR other than UI reads as."""
    values = value if isinstance(value, (list, MultiValue)) else [value]
    return bool(values) and all(isinstance(v, str) for v in values)


def _with_text(raw: RawDataElement, text: str, padding: str) -> RawDataElement:
    data = _padded(text, padding)
    return raw._replace(value=data, length=len(data))


def _padded(text: str, padding: str) -> bytes:
    return (text + padding * (len(text) % 2)).encode(default_encoding)


def _shifted(day: date | None, days: int) -> str:
    """`day` moved `days` back as DA text; empty when there is no date or the shift would pass year 1 (the
    0001-01-01 placeholder some systems write for 'no date'). isoformat keeps four-digit years below 1000."""
    if day is None or day.toordinal() <= days:
        return ""
    return (day - timedelta(days=days)).isoformat().replace("-", "")


def _parse_date(value: str) -> date | None:
    text = value.strip().replace(".", "")  # ACR-NEMA wrote YYYY.MM.DD
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _mark_deidentified(ds: Dataset, options: DeidOptions) -> None:
    earlier = [code for code in _earlier_method_codes(ds) if code not in options.method_codes()]
    if ds.original_encoding == EXPLICIT_LITTLE and not earlier:  # the usual case: the marks already encoded
        for tag, raw in _encoded_marks(options).items():
            ds[tag] = raw
    else:
        _set_marks(ds, options, earlier)


def _earlier_method_codes(ds: Dataset) -> list[tuple[str, str]]:
    """The methods an earlier de-identification recorded: the sequence is added to, not replaced, so the object still
    says everything done to it. Only CID 7050 codes stay (with their standard meanings); the rest of the sequence, and
    the free-text De-identification Method, are untrusted text that may name someone."""
    earlier = []
    for item in ds.get("DeidentificationMethodCodeSequence") or []:
        value, scheme = str(item.get("CodeValue", "")).strip(), str(item.get("CodingSchemeDesignator", "")).strip()
        code = (value, METHOD_CODE_MEANINGS.get(value, ""))
        if scheme == "DCM" and code[1] and code not in earlier:
            earlier.append(code)
    return earlier


def _set_marks(ds: Dataset, options: DeidOptions, earlier: list[tuple[str, str]] = ()) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [
        "PS3.15 E Basic Profile",
        *(["Retain Long. Temporal Info Modified Dates"] if options.modified_dates else []),
        *(["Retain Patient Characteristics"] if options.retain_characteristics else []),
        f"medtriage {__version__}; {TABLE_EDITION}"[:64],
    ]
    items = []
    for value, meaning in [*options.method_codes(), *earlier]:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if options.modified_dates else "REMOVED"


@lru_cache(maxsize=8)
def _encoded_marks(options: DeidOptions) -> dict[int, RawDataElement]:
    """The marks as pydicom reads them back from explicit VR little endian: encoded once per options.
    Raw elements are immutable, so every data set can share them (reading one decodes a copy)."""
    marks = Dataset()
    _set_marks(marks, options)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = EXPLICIT_LITTLE
    write_dataset(fp, marks)
    decoded = read_dataset(io.BytesIO(fp.getvalue()), *EXPLICIT_LITTLE)
    return {int(tag): decoded.get_item(tag) for tag in decoded.keys()}


def _rebuild_file_meta(ds: Dataset) -> None:
    """Fresh file meta: the old one can name the sending station and carry private information."""
    meta = FileMetaDataset()
    for tag, vr, value in (
        (0x00020002, "UI", ds.SOPClassUID),
        (0x00020003, "UI", ds.SOPInstanceUID),
        (0x00020010, "UI", transfer_syntax(ds)),
        (0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
        (0x00020013, "SH", IMPLEMENTATION_VERSION_NAME),
    ):
        # values that are already UIDs and names: no second conversion and validation
        meta[tag] = DataElement(tag, vr, value, already_converted=True)
    ds.file_meta = meta
