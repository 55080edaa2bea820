"""Identity planted where an otherwise acceptable file can carry it, ingested with `ingest_site`, and looked for in
every byte of the pooled file: nested images, overlays and curves, private blocks, standard attributes written as UN,
names in ISO 2022 and GB18030, the file meta, the preamble and what follows the data set, signatures and original
attributes, dates with offsets; and the places that reached the pool before: free text in the content items of a
protocol context, the issuer of a Patient ID, of an accession number and of an order, the site's own coding schemes,
addresses naming the site's PACS (Retrieve URL and URI, nested too), an image nested in an item, and bytes past the
frames of native pixel data."""

from __future__ import annotations

import csv
import io
import struct
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence_item
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, generate_uid

from medtriage.io.ingest import ingest_site
from medtriage.io.site_key import SiteKey

KEY = SiteKey(b"adversarial-review-secret-0123456789")
ROOT = "1.2.826.0.1.3680043.8.498."  # a real implementation root, so original UIDs look like a site's
PATIENT = dict(
    PatientName="DOEHRING^JANETTE",
    PatientID="MRN-47110815",
    PatientBirthDate="19610203",
    AccessionNumber="ACC4711XZ9",
    InstitutionName="Saint Elsewhere General Hospital",
    OperatorsName="TECHNICIAN^TOMASZ",
)
EVERYWHERE = ["DOEHRING", "JANETTE", "MRN-47110815", "19610203", "ACC4711XZ9", "Elsewhere", "TOMASZ"]
PLACES: dict[str, tuple] = {}  # name -> (builder, planted values)


def place(name: str, *planted: str | bytes):
    def register(build):
        PLACES[name] = (build, planted)
        return build

    return register


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _saved(ds: Dataset, syntax=None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _before_the_data_set(data: bytes, element: bytes) -> bytes:
    """The file with an encoded element put before the data set's first, Specific Character Set (0008,0005)."""
    at = data.index(b"\x08\x00\x05\x00CS")
    return data[:at] + element + data[at:]


def _as_un(ds: Dataset, tag: int, value: bytes | list[Dataset]) -> None:
    """Text as bytes, or items encoded in implicit VR (undefined length), under VR UN: what a converter that did not
    know the attribute writes."""
    length = len(value) if isinstance(value, bytes) else 0xFFFFFFFF
    if not isinstance(value, bytes):
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = True, True
        for item in value:
            item.is_undefined_length_sequence_item = True
            write_sequence_item(fp, item, ["iso8859"])
        value = fp.getvalue()  # the writer ends it with the sequence delimiter
    ds[tag] = RawDataElement(Tag(tag), "UN", length, value, 0, False, True)


# ---------------------------------------------------------------- places that reached the pool


@place("protocol_context_text", "call Mrs DOEHRING", "PROTOCOL^PERSON")
def _(ds):
    """Performed Protocol Code Sequence (not listed) holds content items; their Text Value was kept."""
    text = _item(ValueType="TEXT", TextValue="call Mrs DOEHRING on 555-0100")
    text.ConceptNameCodeSequence = [_item(CodeValue="121106", CodingSchemeDesignator="DCM", CodeMeaning="Comment")]
    protocol = _item(CodeValue="P1", CodingSchemeDesignator="99ACME", CodeMeaning="Chest")
    protocol.ProtocolContextSequence = [text, _item(ValueType="PNAME", PersonName="PROTOCOL^PERSON")]
    ds.PerformedProtocolCodeSequence = [protocol]
    return _saved(ds)


@place("protocol_context_text_implicit", "call Mrs DOEHRING")
def _(ds):
    protocol = _item(CodeValue="P1", CodingSchemeDesignator="99ACME", CodeMeaning="Chest")
    protocol.ProtocolContextSequence = [_item(ValueType="TEXT", TextValue="call Mrs DOEHRING on 555-0100")]
    ds.PerformedProtocolCodeSequence = [protocol]
    return _saved(ds, ImplicitVRLittleEndian)


@place("content_item_modifier_text", "DOEHRING prefers")
def _(ds):
    modifier = _item(ValueType="CODE")
    modifier.ContentItemModifierSequence = [_item(ValueType="TEXT", TextValue="DOEHRING prefers the left arm")]
    protocol = _item(CodeValue="P1", CodingSchemeDesignator="99ACME", CodeMeaning="Chest")
    protocol.ProtocolContextSequence = [modifier]
    ds.ScheduledProtocolCodeSequence = [protocol]
    return _saved(ds)


@place("issuer_of_patient_id_qualifiers", "ST ELSEWHERE MPI", "mpi.st-elsewhere.org")
def _(ds):
    """Issuer of Patient ID is X; the sequence qualifying that issuer was kept, names and addresses with it."""
    qualifiers = _item(UniversalEntityID="mpi.st-elsewhere.org", UniversalEntityIDType="DNS", IdentifierTypeCode="MR")
    qualifiers.AssigningFacilitySequence = [_item(LocalNamespaceEntityID="ST ELSEWHERE MPI")]
    ds.IssuerOfPatientID, ds.IssuerOfPatientIDQualifiersSequence = "ST ELSEWHERE MPI", [qualifiers]
    return _saved(ds)


@place("issuer_qualifiers_in_source_patient_group", "mpi.st-elsewhere.org")
def _(ds):
    group = _item(PatientID="MRN-47110815", IssuerOfPatientID="ST ELSEWHERE MPI")
    group.IssuerOfPatientIDQualifiersSequence = [_item(UniversalEntityID="mpi.st-elsewhere.org", UniversalEntityIDType="DNS")]
    ds.SourcePatientGroupIdentificationSequence = [group]
    return _saved(ds)


@place("order_placer_and_filler_issuers", "ELSEWHERE ORDERS", "ELSEWHERE RIS")
def _(ds):
    """Placer and Filler Order Numbers are Z; the sequences naming who issued them were kept."""
    ds.PlacerOrderNumberImagingServiceRequest, ds.FillerOrderNumberImagingServiceRequest = "ORD-4711", "FIL-4711"
    ds.OrderPlacerIdentifierSequence = [_item(LocalNamespaceEntityID="ELSEWHERE ORDERS")]
    ds.OrderFillerIdentifierSequence = [_item(LocalNamespaceEntityID="ELSEWHERE RIS")]
    return _saved(ds)


@place("site_coding_scheme", "Saint Elsewhere", "codes.st-elsewhere.org")
def _(ds):
    """A site's own coding scheme, described in the SOP Common module: its responsible organisation is the site."""
    ds.CodingSchemeIdentificationSequence = [
        _item(
            CodingSchemeDesignator="99STELSW",
            CodingSchemeName="Saint Elsewhere procedure codes",
            CodingSchemeResponsibleOrganization="Saint Elsewhere General Hospital",
            CodingSchemeURL="https://codes.st-elsewhere.org/procedures",
        )
    ]
    return _saved(ds)


@place("issuer_of_accession_number", "ELSEWHERE RIS", "ris.st-elsewhere.org")
def _(ds):
    ds.IssuerOfAccessionNumberSequence = [
        _item(LocalNamespaceEntityID="ELSEWHERE RIS", UniversalEntityID="ris.st-elsewhere.org", UniversalEntityIDType="DNS")
    ]
    return _saved(ds)


@place("retrieve_url_host_and_query", "pacs.st-elsewhere.org", "MRN-47110815")
def _(ds):
    """Retrieve URL was kept with only its UIDs remapped: the host names the site's PACS, the query a Patient ID."""
    ds.RetrieveURL = f"https://pacs.st-elsewhere.org/viewer?patientID=MRN-47110815&studyUID={ds.StudyInstanceUID}"
    return _saved(ds)


@place("retrieve_urls_in_references_implicit", "pacs.st-elsewhere.org", "MRN-47110815")
def _(ds):
    address = "https://pacs.st-elsewhere.org/wado-rs/studies/1?PatientID=MRN-47110815"
    instance = _item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=ROOT + "4716", RetrieveURL=address)
    series = _item(SeriesInstanceUID=ROOT + "4717", RetrieveURL=address, RetrieveURI=address)
    series.ReferencedSOPSequence = [instance]
    ds.ReferencedSeriesSequence = [series]
    return _saved(ds, ImplicitVRLittleEndian)


@place("pixel_data_in_an_item", b"DOEHRING^JANETTE ")
def _(ds):
    """An image inside an item other than the Icon Image Sequence: its pixels are never screened."""
    reference = _item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=ROOT + "4711")
    reference.add_new(0x7FE00010, "OB", b"DOEHRING^JANETTE " * 4)
    ds.ReferencedImageSequence = [reference]
    return _saved(ds)


@place("native_pixels_past_the_frames", b"DOEHRING^JANETTE")
def _(ds):
    ds.PixelData += b"DOEHRING^JANETTE MRN-47110815"
    return _saved(ds)


@place("native_frames_past_number_of_frames", b"DOEHRING^JANETTE")
def _(ds):
    ds.PixelData += b"DOEHRING^JANETTE" * (len(ds.PixelData) // 16)
    return _saved(ds)


@place("native_pixels_past_the_frames_implicit", b"DOEHRING^JANETTE")
def _(ds):
    ds.PixelData += b"DOEHRING^JANETTE!"  # odd: the pad byte to even length is written as a null
    return _saved(ds, ImplicitVRLittleEndian)


# ---------------------------------------------------------------- places the profile already cleaned


@place("icon_image_sequence", b"ICONPIXELS", "ICON^NAME")
def _(ds):
    icon = _item(Rows=4, Columns=5, SamplesPerPixel=1, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    icon.PhotometricInterpretation, icon.PixelData, icon.PatientName = "MONOCHROME2", b"ICONPIXELS" * 2, "ICON^NAME"
    ds.IconImageSequence = [icon]
    return _saved(ds)


def _overlay(ds: Dataset, group: int) -> None:
    for element, vr, value in (
        (0x0010, "US", 4),
        (0x0011, "US", 4),
        (0x0040, "CS", "G"),
        (0x0050, "SS", [1, 1]),
        (0x0100, "US", 1),
        (0x0102, "US", 0),
        (0x0022, "LO", "OVERLAY DESCRIPTION DOEHRING"),
        (0x1500, "LO", "OVERLAY LABEL DOEHRING"),
        (0x4000, "LT", "OVERLAY COMMENTS DOEHRING"),
        (0x3000, "OW", b"OVERLAYBITS!"),
    ):
        ds.add_new((group, element), vr, value)


@place("overlay_explicit", "OVERLAY", b"OVERLAYBITS")
def _(ds):
    _overlay(ds, 0x6000)
    return _saved(ds)


@place("overlay_implicit", "OVERLAY", b"OVERLAYBITS")
def _(ds):
    _overlay(ds, 0x6002)
    return _saved(ds, ImplicitVRLittleEndian)


@place("curve", "CURVE LABEL", b"CURVEDATA")
def _(ds):
    ds.add_new((0x5000, 0x0005), "US", 2)
    ds.add_new((0x5000, 0x2500), "LO", "CURVE LABEL DOEHRING")
    ds.add_new((0x5000, 0x3000), "OB", b"CURVEDATA!")
    return _saved(ds)


def _private(ds: Dataset, un: bool = True) -> None:
    block = ds.private_block(0x0029, "ACME HOSPITAL PACS", create=True)
    block.add_new(0x01, "LO", "PRIVATE DOEHRING")
    if un:  # not swapped to big endian
        block.add_new(0x02, "UN", b"PRIVATE UN BYTES")
    block.add_new(0x03, "SQ", [_item(PatientName="PRIVATE^ITEM")])
    reference = _item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=ROOT + "4712")
    reference.private_block(0x0011, "VENDOR", create=True).add_new(0x10, "LO", "PRIVATE NESTED")
    ds.ReferencedImageSequence = [reference]


@place("private_explicit", "PRIVATE", "ACME HOSPITAL")
def _(ds):
    _private(ds)
    return _saved(ds)


@place("private_implicit", "PRIVATE", "ACME HOSPITAL")
def _(ds):
    _private(ds)
    return _saved(ds, ImplicitVRLittleEndian)


@place("private_big_endian", "PRIVATE", "ACME HOSPITAL")
def _(ds):
    _private(ds, un=False)
    ds.PixelData = ds.pixel_array.byteswap().tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    return buffer.getvalue()


@place("standard_text_as_un", "UN NAME", "UN INSTITUTION", "UN ADDRESS", "UN OPERATOR")
def _(ds):
    for tag, value in (
        (0x00080080, b"UN INSTITUTION  "),
        (0x00080081, b"UN ADDRESS"),
        (0x00081070, b"UN OPERATOR "),
        (0x00100010, b"UN NAME^DOEHRING"),
    ):
        _as_un(ds, tag, value)
    return _saved(ds)


@place("standard_sequences_as_un", "OTHER-ID-4711", "REFERENCED^PATIENT", "SCHEDULED^PHYSICIAN", "SCHEDULED STEP")
def _(ds):
    _as_un(ds, 0x00081120, [_item(PatientName="REFERENCED^PATIENT")])
    _as_un(ds, 0x00101002, [_item(PatientID="OTHER-ID-4711", IssuerOfPatientID="ELSEWHERE")])
    step = _item(ScheduledPerformingPhysicianName="SCHEDULED^PHYSICIAN", ScheduledProcedureStepDescription="SCHEDULED STEP")
    _as_un(ds, 0x00400100, [step])
    return _saved(ds)


@place("deep_nesting", "DEEP TEXT", "DEEP^PERSON", "DEEP-ID", "DEEP ADDRESS", "DEEP STATION", "DEEP COMMENT")
def _(ds):
    reference = _item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=ROOT + "4713")
    reference.ContentSequence = [_item(ValueType="TEXT", TextValue="DEEP TEXT", PersonName="DEEP^PERSON")]
    ds.ReferencedImageSequence = [reference]
    ds.RequestAttributesSequence = [_item(RequestedProcedureID="DEEP-ID", ScheduledProcedureStepDescription="DEEP TEXT")]
    ds.ReferencedPatientSequence = [_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1", ReferencedSOPInstanceUID=ROOT + "4714")]
    ds.OtherPatientIDsSequence = [_item(PatientID="DEEP-ID", IssuerOfPatientID="DEEP STATION")]
    ds.ScheduledProcedureStepSequence = [
        _item(
            ScheduledPerformingPhysicianName="DEEP^PERSON",
            ScheduledStationAETitle="DEEP STATION",
            ScheduledProcedureStepLocation="DEEP ADDRESS",
            PreMedication="DEEP TEXT",
            CommentsOnTheScheduledProcedureStep="DEEP COMMENT",
        )
    ]
    ds.ContributingEquipmentSequence = [
        _item(Manufacturer="ACME", InstitutionName="DEEP STATION", StationName="DEEP STATION", OperatorsName="DEEP^PERSON")
    ]
    ds.ModifiedAttributesSequence = [_item(PatientName="DEEP^PERSON", PatientAddress="DEEP ADDRESS", PatientID="DEEP-ID")]
    return _saved(ds)


def _jis(text: str) -> bytes:
    """The JIS X 0208 bytes ISO 2022 IR 87 writes between its escape sequences."""
    return text.encode("iso2022_jp")[3:-3]


@place("iso_2022_names", _jis("山田"), _jis("やまだ"), _jis("花子"), "Yamada", "길동".encode("euc_kr"), "Gildong")
def _(ds):
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.OtherPatientNames, ds.PatientMotherBirthName = "Yamada^Tarou=山田^太郎", "山田^花子"
    reference = _item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1", ReferencedSOPInstanceUID=ROOT + "4715")
    reference.SpecificCharacterSet, reference.PatientName = ["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"
    ds.ReferencedPatientSequence = [reference]
    return _saved(ds)


@place("gb18030_names", "王小".encode("gb18030"), "Wang^XiaoDong")
def _(ds):
    ds.SpecificCharacterSet = "GB18030"
    ds.PatientName, ds.ReferringPhysicianName = "Wang^XiaoDong=王小东", "王小红"
    return _saved(ds)


@place("file_meta", "ELSEWHERE_PACS", "ELSEWHERE_SEND", "ELSEWHERE_RECV", "10.11.12.13", "ELSEWHERE1", "META PRIVATE", ROOT + "999")
def _(ds):
    meta = ds.file_meta
    meta.SourceApplicationEntityTitle, meta.SendingApplicationEntityTitle = "ELSEWHERE_PACS", "ELSEWHERE_SEND"
    meta.ReceivingApplicationEntityTitle, meta.SourcePresentationAddress = "ELSEWHERE_RECV", "dicom://10.11.12.13:104"
    meta.ImplementationVersionName, meta.PrivateInformationCreatorUID = "ELSEWHERE1", ROOT + "999"
    meta.PrivateInformation = b"META PRIVATE DOEHRING"
    return _saved(ds)


@place("preamble", "PREAMBLE")
def _(ds):
    ds.preamble = b"PREAMBLE DOEHRING".ljust(128, b"\0")
    return _saved(ds)


@place("after_the_data_set", b"TRAILING PADDING", b"AFTER THE END", b"UNKNOWN PUBLIC", b"MOVE_AE")
def _(ds):
    ds.add_new(0xFFFCFFFC, "OB", b"TRAILING PADDING DOEHRING!")  # Data Set Trailing Padding
    data = _saved(ds) + struct.pack("<HH4sL", 0xFFFE, 0xFFFE, b"OB\0\0", 14) + b"AFTER THE END!"
    data += struct.pack("<HH4sL", 0xFFFF, 0x0010, b"OB\0\0", 14) + b"UNKNOWN PUBLIC"
    return _before_the_data_set(data, struct.pack("<HH2sH", 0, 0x1030, b"AE", 8) + b"MOVE_AE ")  # a command element


@place("meta_group_in_the_data_set", "BODY_META_AE")
def _(ds):
    return _before_the_data_set(_saved(ds), struct.pack("<HH2sH", 2, 0x16, b"AE", 12) + b"BODY_META_AE")


@place("signatures_and_original_attributes", b"SIGNER CERT", b"SIGNATURE", "OLD^NAME", "OLD-ID", "OLD SYSTEM", "ENCRYPTED")
def _(ds):
    signature = _item(
        MACIDNumber=1, DigitalSignatureUID=ROOT + "66", DigitalSignatureDateTime="20230105120000", CertificateType="X509_1993_SIG"
    )
    signature.CertificateOfSigner, signature.Signature = b"SIGNER CERT CN=HIBBERT,O=Saint Elsewhere", b"SIGNATURE!"
    ds.DigitalSignaturesSequence = [signature]
    mac = _item(MACIDNumber=1, MACCalculationTransferSyntaxUID="1.2.840.10008.1.2.1", MACAlgorithm="RIPEMD160")
    mac.DataElementsSigned = [0x00100010]
    ds.MACParametersSequence = [mac]
    original = _item(SourceOfPreviousValues="Saint Elsewhere", AttributeModificationDateTime="20230105", ModifyingSystem="OLD SYSTEM")
    original.ReasonForTheAttributeModification = "COERCE"
    original.ModifiedAttributesSequence = [_item(PatientName="OLD^NAME", PatientID="OLD-ID", PatientBirthDate="19610203")]
    ds.OriginalAttributesSequence = [original]
    encrypted = _item(EncryptedContentTransferSyntaxUID="1.2.840.10008.1.2.1")
    encrypted.EncryptedContent = b"ENCRYPTED DOEHRING"
    ds.EncryptedAttributesSequence = [encrypted]
    ds.DeidentificationMethod = "ENCRYPTED by HIBBERT"
    return _saved(ds)


@place("dates_with_offsets", "20230105", "+0100", "2023.01.05")
def _(ds):
    ds.StudyDate = ds.ContentDate = ds.LastMenstrualDate = "20230105"
    ds.AcquisitionDateTime, ds.TimezoneOffsetFromUTC = "20230105120000.000000+0100", "+0100"
    ds.InstanceCreationDate, ds.PatientBirthTime = "2023.01.05", "101010"
    ds.DateOfLastCalibration = ["20230105", "20230105"]
    ds.PatientBirthDateInAlternativeCalendar = "19610203"
    return _saved(ds)


# ---------------------------------------------------------------- the run


def _patient(name: str) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.BurnedInAnnotation = "NO"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=ROOT, entropy_srcs=[name])
    return ds


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> dict[str, bytes | str]:
    """Each place's pooled file, or its quarantine reason: one ingest of a site holding one file per place."""
    root = tmp_path_factory.mktemp("adversarial")
    site, sources = root / "site", {}
    site.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on the odd values planted
        for name, (build, _) in PLACES.items():
            sources[name] = build(_patient(name))
            (site / f"{name}.dcm").write_bytes(sources[name])
        summary = ingest_site("a", site, root / "pool", key=KEY, progress=False)
    with open(next((root / "pool").rglob("index.csv")), newline="") as f:
        index = {row["content_key"]: row for row in csv.DictReader(f)}
    results = {}
    for name, data in sources.items():
        row = index[KEY.content_key(data)]
        results[name] = (root / "pool" / "a" / row["path"]).read_bytes() if row["outcome"] == "pooled" else row["reason"]
    assert summary.pooled == len(PLACES), summary.line()
    return results


def _variants(value: str | bytes) -> list[bytes]:
    """How a planted value can lie in a file: as written, and in UTF-16 either way."""
    if isinstance(value, bytes):
        return [value]
    return [value.encode("utf-8"), value.encode("utf-16-le"), value.encode("utf-16-be")]


@pytest.mark.parametrize("name", list(PLACES))
def test_no_planted_value_reaches_the_pooled_file(pooled, name):
    data = pooled[name]
    assert isinstance(data, bytes), f"quarantined as {data}"
    planted = [*PLACES[name][1], *EVERYWHERE]
    assert not [value for value in planted if any(v in data for v in _variants(value))]
    pydicom.dcmread(io.BytesIO(data))  # and the pooled file still reads


def test_content_items_keep_a_text_value_and_issuers_go(pooled):
    """Text Value is Type 1C in a TEXT content item: a dummy keeps the item valid, as Unformatted Text Value's D does."""
    ds = pydicom.dcmread(io.BytesIO(pooled["protocol_context_text"]))
    text, person = ds.PerformedProtocolCodeSequence[0].ProtocolContextSequence
    assert text.TextValue == person.PersonName == "ANONYMIZED" and text.ConceptNameCodeSequence[0].CodeValue == "121106"
    ds = pydicom.dcmread(io.BytesIO(pooled["issuer_of_patient_id_qualifiers"]))
    assert "IssuerOfPatientIDQualifiersSequence" not in ds and "IssuerOfPatientID" not in ds
    ds = pydicom.dcmread(io.BytesIO(pooled["order_placer_and_filler_issuers"]))
    assert "OrderPlacerIdentifierSequence" not in ds and "OrderFillerIdentifierSequence" not in ds
    assert "CodingSchemeIdentificationSequence" not in pydicom.dcmread(io.BytesIO(pooled["site_coding_scheme"]))
    reference = pydicom.dcmread(io.BytesIO(pooled["pixel_data_in_an_item"])).ReferencedImageSequence[0]
    assert "PixelData" not in reference and reference.ReferencedSOPInstanceUID == KEY.uid(ROOT + "4711")


@pytest.mark.parametrize(
    "name", ["native_pixels_past_the_frames", "native_frames_past_number_of_frames", "native_pixels_past_the_frames_implicit"]
)
def test_bytes_past_the_frames_go_and_the_pixels_stay(pooled, name):
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(io.BytesIO(pooled[name]))
    assert ds.PixelData == original.PixelData  # 128 x 128 x 16 bits: even, no pad byte
    assert np.array_equal(ds.pixel_array, original.pixel_array)
