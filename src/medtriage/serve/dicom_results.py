"""Triage results as a DICOM Comprehensive SR (TID 1500 measurement report) with highdicom.

One SR per source instance (or, for the DICOM node, one per study covering all its scored
instances), in the source's study, referencing the source study, series and instance (and frame);
each scored frame is one measurement group carrying the probability (calibrated where the package applies a
temperature), the finding, the priority, each failed safety check it was scored despite (--allow-out-of-scope) and
the algorithm name/version (with the model's sha256).

A result names the package that scored it (name, version, sha256 of model.onnx), taken from its scores, not
from the package loaded now: a node restarted with a new package still closes the studies scored before. The
package is named in the content tree (TID 4019 Algorithm Identification of every measurement), in the General
Equipment attributes a PACS lists, and in the Contributing Equipment Sequence (Processing Equipment).
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import highdicom as hd
import pydicom
from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from pydicom.valuerep import DA, TM, validate_value

from medtriage import __version__
from medtriage.errors import DicomError, ImageTooLargeError, MedTriageError
from medtriage.io.clamped import dicom_source, read_part10
from medtriage.io.safe_output import output_path, write_atomic
from medtriage.serve.node.header import ReadBudget
from medtriage.serve.package import ModelPackage, calibrated_result, identity_label
from medtriage.serve.predictor import Score

log = logging.getLogger(__name__)
# highdicom's warning on each one-part Patient's Name a result object copies (a pseudonym, "ANONYMOUS"): it quotes the name.
PERSON_NAME_WARNING = r"(?s)The string .* is unlikely to represent the intended person name"
MANUFACTURER = "MedTriage"
LONG_STRING = 64  # the most characters of an LO value (PS3.5 6.2): Series Description, Manufacturer's Model Name
SHORT_STRING = 16  # the most characters of an SH value: Code Value
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})  # encoded in the Specific Character Set
UTF8 = "ISO_IR 192"
CHARACTER_SETS = frozenset(term.value for term in hd.enum.SpecificCharacterSetValues)  # the terms the builders accept
# Terms with code extensions (PS3.3 C.12.1.1.2) the builders accept in a Specific Character Set of several values.
SINGLE_BYTE_EXTENSIONS = frozenset(f"ISO 2022 IR {number}" for number in (6, 100, 101, 109, 110, 126, 127, 138, 144, 148, 13, 166))
MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159"})
SCHEME = "99MEDTRIAGE"  # local coding scheme ("99" prefix = private, PS3.16 8.2) for model-specific concepts
PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
PRIORITY = hd.sr.CodedConcept("priority", SCHEME, "Triage priority")
DECISION = hd.sr.CodedConcept("decision", SCHEME, "Triage decision against the operating points")
DECISION_CODES = {"URGENT": "above-urgent", "review": "above-review", "routine": "below-review"}
# A score made although a safety check failed (--allow-out-of-scope): each of its flags, said beside its priority.
CAVEAT = hd.sr.CodedConcept("caveat", SCHEME, "Scored despite a failed safety check")
CAVEATS = {"out_of_scope": "Outside the model's scope", "unusual_input": "Unlike the model's training images"}
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
SR_SERIES_NUMBER = 9901
# What the header an SR references may hold before its pixels: the per-frame functional groups of a sparse-tiled
# slide level of 100,000 tiles come to about 20 MiB; a header past this is read no further.
SR_HEADER_READ_BYTES = 32 << 20
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float and Pixel Data: where a header ends
# What an SR references each source by: the evidence's study, series and instance, and each measurement's image.
REFERENCED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
# What to do about an SR the builders refused: the UIDs are there (checked first), so a value of the header is damaged.
SR_HINT = (
    "export the image again from the system that made it: an SR needs a readable header holding the image's Study, "
    "Series and SOP Instance UIDs and SOP Class UID; its score needs none of them and is given without an SR"
)
PATIENT_SEX = ("M", "F", "O")  # PS3.3 C.7.1.1: the enumerated values
# Image storage SOP classes whose IOD has no Multi-frame module (PS3.3 Annex A): a reference to one of their
# instances names no frame (Referenced Frame Number is Type 1C, for multi-frame images only: PS3.3 Table 10-3).
SINGLE_FRAME_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray, for presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray, for processing
        "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray, for presentation
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray, for processing
        "1.2.840.10008.5.1.4.1.1.1.3",  # Digital Intra-Oral X-Ray, for presentation
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray, for processing
        "1.2.840.10008.5.1.4.1.1.2",  # CT
        "1.2.840.10008.5.1.4.1.1.4",  # MR
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.128",  # PET
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic
        "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic
        "1.2.840.10008.5.1.4.1.1.77.1.3",  # VL Slide-Coordinates Microscopic
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic
        "1.2.840.10008.5.1.4.1.1.77.1.7",  # Dermoscopic Photography
    }
)


def read_header(source: str | Path | bytes | BinaryIO) -> pydicom.Dataset:
    """The source's header (no pixels), for the references the SR carries. The header is untrusted and may hold
    anything before the pixels (a private element of gigabytes): one past SR_HEADER_READ_BYTES is refused before
    more is read into memory."""
    where = _named(source)
    try:
        with dicom_source(source, where) as fp:  # a deflated data set is still refused past the decode limits
            budget = lambda data_set: ReadBudget(data_set, SR_HEADER_READ_BYTES, lambda: _header_too_large(where))  # noqa: E731
            header = read_part10(fp, where, stop_when=_at_pixels, force=True, data_set=budget)  # inflates the header only
        header.buffer = None  # the reader it came through, of no use now: copying the header (carried_header) would warn
        return header
    except (ImageTooLargeError, DicomError):
        raise
    except OSError as err:  # the file moved, removed or made unreadable after it was scored
        raise DicomError(
            f"cannot read the file again for the header the SR references ({err.strerror or type(err).__name__})",
            where=where,
            hint="leave the file in place and readable until its results are written, then score it again",
        ) from err
    except Exception as err:
        raise DicomError(f"cannot read the header to reference in the SR ({err})", where=where, hint=SR_HINT) from err


def _header_too_large(where: str) -> DicomError:
    return DicomError(
        f"the header before the pixel data holds over {SR_HEADER_READ_BYTES} bytes to read, too many to reference in the SR",
        where=where,
        hint="the sending system must send the image without bulk data before its pixels, such as a large private element or overlay",
    )


def _named(source: str | Path | bytes | BinaryIO) -> str:
    """A source as messages name it: its whole path (a Path's `name` is its last part only), a file's name, or <bytes>."""
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    return str(source if isinstance(source, (str, Path)) else getattr(source, "name", source))


def _at_pixels(tag, _vr, _length) -> bool:
    return tag in PIXEL_TAGS


@contextmanager
def built_from_header(what: str, where: str, hint: str | None = None) -> Iterator[None]:
    """Builders copy attributes from the source's header, which is untrusted: pydicom converts values lazily and
    highdicom checks them, so a damaged header surfaces as any exception type, which becomes a DicomError here."""
    try:
        yield
    except MedTriageError:
        raise
    except Exception as err:
        raise DicomError(f"cannot build {what} ({type(err).__name__}: {err})", where=where, hint=hint) from err


def encoded(dataset: pydicom.Dataset, what: str, where: str) -> bytes:
    """A built object as Part 10 bytes (values copied from a damaged header can still fail to encode)."""
    buffer = io.BytesIO()
    with built_from_header(what, where):
        dataset.save_as(buffer)
    return buffer.getvalue()


def build_sr(source: pydicom.Dataset, scores: list[Score], package: ModelPackage) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR for the scores of one source instance."""
    return build_study_sr([(source, scores)], package)


def build_study_sr(
    sources: list[tuple[pydicom.Dataset, list[Score]]],
    package: ModelPackage,
    sop_instance_uid: str | None = None,
    revision: int | None = None,
) -> hd.sr.ComprehensiveSR:
    """One Comprehensive SR for several instances of one study: a measurement group per scored frame,
    each referencing its instance; the study and patient attributes come from the first instance.
    `revision` (1, 2, ...: the study's reports so far, plus one) puts every report this model makes on the study
    in one series, numbered in order; without it the report is a series of its own. `package` is the one loaded
    now; the scores name the package that made them and the label their probability is of."""
    # The report's equipment is the package of its first measurement; each measurement names its own, and every
    # package that scored one is contributing equipment (more than one only where a restart changed the package).
    identities = _scoring_packages(score for _, scores in sources for score in scores)
    with built_from_header("an SR referencing this file", where=str(sources[0][1][0].file), hint=SR_HINT):
        sources = [(carried_header(source), scores) for source, scores in sources]
        for source, scores in sources:
            _require_references(source, str(scores[0].file))
        groups = [_measurement_group(source, score, package) for source, scores in sources for score in scores]
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(identities[0]),
            procedure_reported=PROCEDURE,
            imaging_measurements=groups,
        )
        sr = _ComprehensiveSR(
            evidence=[source for source, _ in sources],
            content=report,
            series_instance_uid=revision_series_uid(sources[0][0], identities[0], "reports") if revision else generate_uid(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=revision or 1,
            series_description=long_string(f"AI triage {identity_label(identities[0])}"),
            is_complete=True,
            contributing_equipment=[scoring_equipment(identity, "scored the referenced images") for identity in identities],
            **equipment(identities[0]),
        )
    sr.CodingSchemeIdentificationSequence = [private_scheme()]
    declare_character_set(sr)
    return sr


def _require_references(source: pydicom.Dataset, where: str) -> None:
    """Refuse a source without the UIDs an SR references it by (Type 1 in every image, yet removed or emptied by some
    de-identifiers and converters): missing, the builders fail on the first they meet, naming no tag; empty, they
    write an SR that references nothing."""
    missing = missing_uids(source, REFERENCED_UIDS)
    if missing:
        raise DicomError(
            f"the image has no value for {', '.join(missing)}, which an SR must reference it by",
            where=where,
            hint="export the image again with its study, series, SOP class and SOP instance UIDs in its header; "
            "its score needs none of them and is given without an SR",
        )


def missing_uids(source: pydicom.Dataset, keywords: Iterable[str]) -> list[str]:
    """Those of `keywords` the source holds no value for, each as "keyword (gggg,eeee)"."""
    return [f"{keyword} {Tag(keyword)}" for keyword in keywords if not str(source.get(keyword) or "").strip()]


class _ComprehensiveSR(hd.sr.ComprehensiveSR):
    """highdicom picks the patient and study attributes to copy by the IOD of the first source's SOP class, and fails
    with a KeyError on a class its edition of the standard does not list: a retired one (the ultrasound of 1993), a
    vendor's private one, or one newer than the installed highdicom. Those modules are alike in every image IOD, so
    such a source's are copied as a Secondary Capture's would be; the evidence still names the source's own class."""

    def copy_patient_and_study_information(self, dataset: pydicom.Dataset) -> None:
        try:
            super().copy_patient_and_study_information(dataset)
        except KeyError:  # raised before any attribute is copied
            stand_in = copy.deepcopy(dataset)  # a header (no pixels); a shallow copy would share its elements
            stand_in.SOPClassUID = SecondaryCaptureImageStorage
            super().copy_patient_and_study_information(stand_in)


def declare_character_set(dataset: pydicom.Dataset) -> None:
    """Declare UTF-8 where the object's text does not fit the character set it copied from its source: the package's
    name and labels are its own text, and a source in the default repertoire (ASCII) or in Latin-1 cannot hold
    "modèle" or "πνευμονία" (written anyway, a reader shows other characters or question marks). Code extensions
    (ISO 2022, several values) are left to pydicom, which switches between them."""
    declared = dataset.get("SpecificCharacterSet")
    if isinstance(declared, (list, pydicom.multival.MultiValue)) and len(declared) > 1:
        return
    codec = convert_encodings(declared)[0] if declared else "ascii"
    for elem in dataset.iterall():
        if elem.VR in TEXT_VRS and not all(_encodes(str(value), codec) for value in _values(elem.value)):
            dataset.SpecificCharacterSet = UTF8
            return


def _values(value) -> list:
    return list(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else [] if value is None else [value]


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def private_scheme() -> pydicom.Dataset:
    """The SOP Common module's Coding Scheme Identification item (PS3.3 C.12.1.1.2) for SCHEME: a reader meeting
    its codes finds who is responsible for them, and that no registry knows them."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "MedTriage triage concepts"
    item.CodingSchemeVersion = __version__[:16]
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def _scoring_packages(scores: Iterable[Score]) -> list[dict]:
    """The identities of the packages that scored `scores`, each once, in the order met."""
    identities: list[dict] = []
    for identity in (score.scoring_package() for score in scores):
        if identity not in identities:
            identities.append(identity)
    return identities


def long_string(text: str) -> str:
    """`text` cut to what an LO attribute holds (a package name has no length limit)."""
    return text[:LONG_STRING]


def code_value(text: str) -> str:
    """`text` as a Code Value (SH, in ASCII as codes are): itself where it fits, else its start and a digest of the
    whole, so that two long labels that begin alike stay two concepts (a label has no length limit or alphabet)."""
    if len(text) <= SHORT_STRING and text.isascii():
        return text
    start = "".join(c for c in text if c.isascii() and c.isprintable() and c != "\\")[:7]
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{start}-{digest}" if start else digest


def concept(text: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the private scheme named by `text` (a label, a priority), its meaning cut to an LO's length."""
    return hd.sr.CodedConcept(code_value(text), SCHEME, long_string(meaning))


def equipment(identity: dict) -> dict:
    """General Equipment attributes (PS3.3 C.7.5.1) of an object the package `identity` made, as highdicom's keyword
    arguments: the package is the model, its version stands beside the software's, and the sha256 of model.onnx
    (64 hex digits, an LO's full length) is the serial number, which tells two exports of one version apart."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": long_string(identity["name"]),
        "software_versions": [long_string(identity_label(identity)), f"medtriage {__version__}"],
        "device_serial_number": identity["sha256"],
    }


def scoring_equipment(identity: dict, contribution: str) -> hd.ContributingEquipment:
    """A Contributing Equipment item (Processing Equipment) for the package `identity`: `contribution` says what it
    did, with the full name and sha256 that the LO attributes may cut short."""
    attributes = equipment(identity)
    return hd.ContributingEquipment(
        attributes.pop("manufacturer"),
        codes.DCM.ProcessingEquipment,
        contribution_description=f"{contribution}: {identity_label(identity)}, model.onnx sha256 {identity['sha256']}",
        **attributes,
    )


def _algorithm(identity: dict) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for the package `identity`. highdicom writes each parameter key as one TEXT item, so each key is a
    whole "name=value"."""
    parameters = {f"sha256={identity['sha256']}": identity["sha256"], f"software=medtriage {__version__}": __version__}
    return hd.sr.AlgorithmIdentification(name=identity["name"], version=str(identity["version"]), parameters=parameters)


# Patient and study attributes the SR must carry (Type 2: present, possibly empty) and copies from its evidence.
# De-identified or minimal sources often leave them out; empty in the SR is what the standard says then.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)

# What a PACS or worklist files a report by, kept as the source has it even where its VR does not allow it (a Patient
# ID of 70 characters): the PACS holds the source with that value, and emptied, the report would belong to no patient.
FILED_BY = ("PatientID", "AccessionNumber")


def carried_header(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source with every copied attribute a result object (the SR, the heatmap) can carry: missing ones empty, and
    values the standard does not allow (a sex of "X", a date written "1990-01-01", a Study ID of 20 characters) emptied
    too, so that one odd value costs that value, not the object; only what a result is filed by (FILED_BY) is kept
    whatever it holds."""
    _quiet_person_name_warnings()
    reasons = {keyword: _carried_value(source, keyword) for keyword in TYPE2_COPIED}
    unusable = {keyword: reason for keyword, reason in reasons.items() if reason is not None}
    character_set = _carried_character_set(source)
    if not unusable and character_set is None:
        return source
    source = copy.deepcopy(source)  # a header (no pixels): the caller's dataset stays as it was
    for keyword, reason in unusable.items():
        if reason:
            log.warning("a result object leaves %s empty: %s", keyword, reason)
        source.pop(keyword, None)  # pydicom reads an element before setting it: an unreadable one is replaced whole
        setattr(source, keyword, "")
    if character_set == [UTF8]:
        declared = str(source.SpecificCharacterSet)[:64]
        log.warning(
            "a result object declares %s: the source's Specific Character Set %r is not a value the standard allows", UTF8, declared
        )
        source.decode()  # the text as pydicom read it (a misspelt term as the one it stands for), before the declaration changes
    if character_set is not None:
        source.SpecificCharacterSet = character_set if len(character_set) > 1 else character_set[0]
    return source


# The patient a result object names: a heatmap's builder copies these from its own image (the SR, from its first source).
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")


def names_patient(header: pydicom.Dataset) -> bool:
    """Whether a header names its patient (a Patient ID): a blank one is unknown."""
    try:
        return bool(str(header.get("PatientID") or "").strip())
    except Exception:  # noqa: BLE001 -- pydicom converts lazily: an unreadable value names no one
        return False


def patient_source(headers: list[pydicom.Dataset]) -> pydicom.Dataset:
    """The header of a study's images that its result objects (the SR, the heatmap) copy their patient from: the first
    that names a Patient ID, as the node holds the study for the first one named, else the first. One choice for all,
    so that a PACS files a study's results under one patient, and not under none where an image left it blank."""
    return next((header for header in headers if names_patient(header)), headers[0])


def naming_patient(source: pydicom.Dataset, patient: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of `source` naming the patient `patient` names (both carried headers of one study): a result drawn from
    one image names the patient its study's other results name. Values are copied as text, encoded in the result's
    own character set (declare_character_set)."""
    named = copy.deepcopy(source)  # a header (no pixels): the caller's dataset stays as it was
    for keyword in PATIENT_KEYWORDS:
        value = patient.get(keyword, "")  # one it lacks is blank: never the other image's patient's
        named.pop(keyword, None)
        setattr(named, keyword, str(value) if value else "")
    return named


def _quiet_person_name_warnings() -> None:
    """Silence highdicom's warning on a one-part Patient's Name: the name is the source's, carried as it is, and quoted
    on stderr or in a service's journal it is patient data, once per file. Installed at each use, not at import: a
    caller's `warnings.catch_warnings` block that the import ran in drops its filters when it ends."""
    if not any(f[0] == "ignore" and getattr(f[1], "pattern", None) == PERSON_NAME_WARNING for f in warnings.filters):
        warnings.filterwarnings("ignore", PERSON_NAME_WARNING, UserWarning, "highdicom")


def _carried_value(source: pydicom.Dataset, keyword: str) -> str | None:
    """None where the source's `keyword` can be carried as it is; else why not ("" where it is missing). A damaged
    header can hold a value pydicom cannot even read (an unknown VR): it costs that value, as a disallowed one does."""
    if keyword not in source:
        return ""
    try:
        value = source[keyword].value
    except Exception as err:  # noqa: BLE001 -- pydicom converts lazily, and a damaged value raises any type
        return f"its value cannot be read ({type(err).__name__}: {err})"
    return None if _carried(keyword, value) else f"{str(value)[:64]!r} is not a value the standard allows"


def _carried_character_set(source: pydicom.Dataset) -> list[str] | None:
    """The Specific Character Set a result object declares for the source's text, None where it is the source's own.
    The builders copy the source's and refuse what PS3.3 C.12.1.1.2 does not allow, though pydicom reads it: a misspelt
    term ("ISO_IR100", "ISO-8859-1"), one unknown, or "ISO_IR 6"; such text is written in UTF-8. The standard's own
    "\\ISO 2022 IR 87", an empty first value, is the "ISO 2022 IR 6" it stands for."""
    declared = [str(term) for term in _values(source.get("SpecificCharacterSet"))]
    terms = ["ISO 2022 IR 6" if i == 0 and not term and len(declared) > 1 else term for i, term in enumerate(declared)]
    if not terms or _declarable(terms):
        return None if terms == declared else terms
    return [UTF8]


def _declarable(terms: list[str]) -> bool:
    """Whether a builder accepts `terms`: one term without code extensions, or several with them, the first single-byte."""
    extensions = SINGLE_BYTE_EXTENSIONS | MULTI_BYTE_EXTENSIONS
    if len(terms) > 1:
        return terms[0] in SINGLE_BYTE_EXTENSIONS and all(term in extensions for term in terms[1:])
    return terms[0] in CHARACTER_SETS and terms[0] not in extensions


def _carried(keyword: str, value) -> bool:
    """Whether an SR builder accepts this copied value (the checks highdicom makes on them), and a validator its VR."""
    if value is None or value == "":
        return True
    if keyword == "PatientSex":
        return value in PATIENT_SEX
    kind = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}.get(keyword)
    try:
        if kind is not None:
            kind(value)
        if keyword not in FILED_BY:  # lengths and characters of its VR: a strict PACS refuses the whole object
            validate_value(dictionary_VR(keyword), str(value), config.RAISE)  # a PersonName is checked as its text
    except (TypeError, ValueError):
        return False
    return True


def revision_series_uid(source: pydicom.Dataset, package: ModelPackage | dict, kind: str) -> str:
    """One series for every object of `kind` this model makes on the source's study, whichever revision (a UID
    derived from them, never a copied value): a reopened study's new report joins its earlier ones. `package` is
    a ModelPackage or, for a report, the identity of the package that scored its first image: the series is that of
    the equipment the report names, so a restart with another package leaves a study's reports in one series."""
    sha256 = package["sha256"] if isinstance(package, dict) else package.sha256
    return generate_uid(entropy_srcs=[f"medtriage triage {kind}", str(source.StudyInstanceUID), sha256])


def _observation_context(identity: dict) -> hd.sr.ObservationContext:
    # The observer is this software running this model: the same UID in every report it makes, so a PACS can
    # tell its reports from others' (a fresh UID per report would be a new device each time).
    device_uid = generate_uid(entropy_srcs=["medtriage device observer", identity["name"], identity["sha256"]])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name="medtriage", manufacturer_name=MANUFACTURER, model_name=identity["name"], serial_number=identity["sha256"]
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )


def _probability_concept(score: Score, package: ModelPackage) -> hd.sr.CodedConcept:
    """What the score's probability is of: the scoring package's positive label. A result stored before scores
    recorded it takes the loaded package's label only where that package made it; otherwise the label is not known,
    and the report says so rather than name a label of another model (its finding, priority and decision were made
    by the scoring package and still stand)."""
    label = score.positive_label or (package.positive_label if score.scoring_package() == package.identity() else "")
    what = "Calibrated probability" if calibrated_result(vars(score), package) else "Probability"
    if not label:
        return hd.sr.CodedConcept("p-unrecorded", SCHEME, f"{what} of an unrecorded label")
    return concept(f"p-{label}", f"{what} of {label}")


def _measurement_group(source: pydicom.Dataset, score: Score, package: ModelPackage) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = _algorithm(score.scoring_package())
    probability = hd.sr.Measurement(
        name=_probability_concept(score, package),
        value=round(score.probability, 6),
        unit=NO_UNITS,
        algorithm_id=algorithm,
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(FINDING, concept(score.finding, score.finding)),
        hd.sr.QualitativeEvaluation(PRIORITY, concept(score.priority.lower(), score.priority)),
    ]
    if score.decision:  # "below review threshold 0.785": why the priority is what it is
        code = DECISION_CODES.get(score.priority, "decision")
        evaluations.append(hd.sr.QualitativeEvaluation(DECISION, hd.sr.CodedConcept(code, SCHEME, score.decision[:64])))
    evaluations += [hd.sr.QualitativeEvaluation(CAVEAT, _caveat(flag)) for flag in score.flags or []]
    frames = referenced_frames(source, score.frame)
    image = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID, referenced_frame_numbers=frames)
    frame_text = f" frame {score.frame}" if score.frame is not None else ""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"triage{frame_text}"),
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=evaluations,
        source_images=[image],
    )


def _caveat(flag: str) -> hd.sr.CodedConcept:
    """A score's flag ("out_of_scope:modality", "unusual_input") as the SR's reader sees it: without it, a score made
    on an image outside the model's scope reads in the PACS as a routine one."""
    kind, _, field = str(flag).partition(":")
    meaning = CAVEATS.get(kind, str(flag))
    return concept(str(flag), f"{meaning} ({field})" if field else meaning)


def referenced_frames(source: pydicom.Dataset, frame: int | None) -> list[int] | None:
    """The frame numbers a reference to `frame` (1-based) of the source names: none for a whole instance, nor for an
    instance of a single-frame SOP class. A source holding frames its class cannot (Number of Frames in a CT or
    ultrasound image) is scored frame by frame, but a reference naming its frame makes the SR or picture invalid,
    which a PACS may refuse whole; the frame is still named in the measurement's tracking identifier."""
    if frame is None or str(source.get("SOPClassUID", "")) in SINGLE_FRAME_CLASSES:
        return None
    return [frame]


def write_sr(source: str | Path | bytes | BinaryIO, scores: list[Score], package: ModelPackage, out_dir: str | Path) -> Path:
    """Write the SR for one source instance to `out_dir/<source SOP UID>.<source digest>.SR.dcm`, atomically.

    The UID is sanitised and the digest of the source (its path, or the uploaded bytes) keeps two
    sources that share a UID apart: a header value never chooses where a file goes."""
    sr = build_sr(read_header(source), scores, package)
    key = (
        source.getvalue()
        if isinstance(source, io.BytesIO)
        else source
        if isinstance(source, (bytes, bytearray))
        else Path(source).resolve()
        if isinstance(source, (str, Path))
        else getattr(source, "name", scores[0].file)
    )
    path = output_path(out_dir, scores[0].sop_uid or sr.SOPInstanceUID, ".SR.dcm", source=key)
    return write_atomic(path, encoded(sr, "the SR", scores[0].file))


def sr_bytes(source: bytes, scores: list[Score], package: ModelPackage) -> bytes:
    return encoded(build_sr(read_header(source), scores, package), "the SR", scores[0].file)
