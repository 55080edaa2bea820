"""De-identification on real headers: pydicom's test files with planted PHI and the deid-data package."""

from __future__ import annotations

import io
import subprocess
from datetime import date
from pathlib import Path

import pydicom
import pytest
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table_e1
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medtriage.errors import ConfigError
from medtriage.io.deid import DeidOptions, deidentify, patient_key, profile_table
from medtriage.io.quarantine import screen
from medtriage.io.site_key import SiteKey, load_site_key
from tests.io.phi_site import build_phi_site, identifying_values, pixel_sha256
from tests.io.test_deid_edges import _reread

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
DEID_DATA = Path(__import__("deid_data").__file__).parent / "data"
DEID_DATA_FILES = sorted(DEID_DATA.rglob("*.dcm"))
CATEGORY_ACTION = {
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


def _exact_table() -> dict[int, str]:
    """Table E.1-1 read straight from the library, independently of medtriage's lookup."""
    return {(t[0] << 16) | t[1]: action for category, action in CATEGORY_ACTION.items() for t in getattr(table_e1, category) if len(t) == 2}


def _roundtrip(ds: Dataset) -> bytes:
    """The file's bytes minus the pixel data itself: pixels stay untouched by design (burned-in text is
    quarantined instead), and a 6-digit serial number can occur in an image by chance."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue().replace(ds.PixelData, b"") if "PixelData" in ds else buffer.getvalue()


@pytest.fixture(scope="module")
def phi_site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    return build_phi_site(folder)


def test_table_covers_e1_1_with_repeating_groups():
    table = profile_table()
    assert len(table.exact) > 600
    assert table.action(0x00100010) == "Z" and table.action(0x00100020) == "Z/D"  # Patient's Name, Patient ID
    assert table.action(0x00080018) == "U" and table.action(0x00081140) == "X/Z/U*"
    assert table.action(0x60023000) == table.action(0x601E4000) == "X"  # overlay data / comments, any overlay group
    assert table.action(0x50120010) == "X"  # curve data
    assert table.action(0x00280010) is None  # Rows: not identifying


@pytest.mark.parametrize("path", DEID_DATA_FILES, ids=lambda p: p.name)
def test_deid_data_headers_leave_no_identifying_value_in_the_bytes(path):
    original = pydicom.dcmread(path)
    values = identifying_values([path])
    assert values, "the fixture must carry identity to remove"
    ds = pydicom.dcmread(path)
    deidentify(ds, KEY)
    data = _roundtrip(ds)
    leaked = sorted(v for v in values if v.encode("latin-1", "ignore") in data)
    assert not leaked
    assert not [e for e in pydicom.dcmread(io.BytesIO(data)).iterall() if e.tag.is_private]
    assert pixel_sha256(ds) == pixel_sha256(original)


def test_planted_phi_is_gone_from_every_byte(phi_site):
    values = identifying_values(phi_site["pooled"])
    assert {"DOEHRING^JANETTE^Q", "MRN-47110815", "19610203", "Saint Elsewhere General Hospital"} <= values
    for path in phi_site["pooled"]:
        ds = pydicom.dcmread(path)
        deidentify(ds, KEY)
        data = _roundtrip(ds)
        assert not [v for v in values if v.encode() in data], path.name


def _pairs(before: Dataset, after: Dataset, path=()):
    """(tag path, element before, element after or None) over both data sets, recursing into sequences."""
    for elem in before:
        now = after.get(elem.tag) if elem.tag in after else None
        yield path + (int(elem.tag),), elem, now
        if elem.VR == "SQ" and now is not None and len(now.value) == len(elem.value):
            for item_before, item_after in zip(elem.value, now.value):
                yield from _pairs(item_before, item_after, path + (int(elem.tag),))


def _shift(value: str, days: int) -> str:
    day = date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    return (day.fromordinal(day.toordinal() - days)).strftime("%Y%m%d") + value[8:]


@pytest.mark.parametrize("source", ["fixture", "deid_data"])
def test_every_table_attribute_present_gets_its_action(phi_site, source):
    table = _exact_table()
    paths = phi_site["pooled"] if source == "fixture" else [DEID_DATA / "humans/ctbrain1.dcm", DEID_DATA / "animals/cat.dcm"]
    retained = {pydicom.datadict.tag_for_keyword(k) for k in DeidOptions().retain_characteristics}
    checked = 0
    for path in paths:
        before, after = pydicom.dcmread(path, stop_before_pixels=True), pydicom.dcmread(path, stop_before_pixels=True)
        result = deidentify(after, KEY)
        for tags, old, new in _pairs(before, after):
            action, tag = table.get(tags[-1]), tags[-1]
            if action is None or old.value in (None, "", b"") or old.tag.is_private:
                continue
            checked += 1
            where = f"{path.name} {pydicom.datadict.keyword_for_tag(tag)}"
            if tag in retained:
                assert new is not None and new.value == old.value, where
            elif old.VR in ("DA", "DT") and tag != 0x00100030:  # modified dates: shifted per patient
                expected = [_shift(v, result.date_shift_days) if len(v) >= 8 else "" for v in _as_list(old.value)]
                assert _as_list(new.value) == expected, where
            elif old.VR == "TM":
                assert new is None or new.value in (old.value, None, ""), where  # whole-day shift keeps times
            elif action == "X":
                assert new is None, where
            elif action == "U" or (action == "X/Z/U*" and old.VR == "UI"):
                assert all(v.startswith("2.25.") or v.startswith("1.2.840.10008.") for v in _as_list(new.value)), where
            elif tag in (0x00100010, 0x00100020):  # names and IDs become the keyed pseudonym
                assert new.value == result.pseudonym, where
            elif old.VR == "SQ" and action != "X/Z/U*":
                assert new is None or len(new.value) == 0, where
            elif old.VR != "SQ":
                assert new is None or new.value in (None, "") or new.value != old.value, where
    assert checked >= 15


def _as_implicit_vr(path: Path) -> Dataset:
    """The same file re-encoded as implicit VR little endian: pydicom reads its elements without a VR."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_raw_edits_give_the_values_of_element_by_element_edits(phi_site):
    """Explicit VR files are edited in their undecoded bytes; implicit VR ones element by element (no VR to
    trust in the bytes): both must end with the same values."""
    native = [p for p in phi_site["pooled"] if not pydicom.dcmread(p).file_meta.TransferSyntaxUID.is_compressed]
    assert len(native) >= 3
    for path in native:
        explicit, implicit = pydicom.dcmread(path), _as_implicit_vr(path)
        assert explicit.original_encoding == (False, True) and implicit.original_encoding == (True, True)
        deidentify(explicit, KEY)
        deidentify(implicit, KEY)
        still_raw = [t for t in explicit.keys() if isinstance(explicit.get_item(t), RawDataElement)]
        assert len(still_raw) > 20  # the quick path was taken: most elements never decoded
        values = [
            {int(e.tag): None if e.is_empty else e.value for e in ds.iterall() if e.VR != "SQ"}  # '' or None
            for ds in (explicit, implicit)
        ]
        assert values[0] == values[1], path.name


def _as_list(value):
    return [str(v) for v in value] if isinstance(value, (list, pydicom.multival.MultiValue)) else [str(value)]


def test_uids_map_consistently_and_references_resolve(phi_site):
    datasets = [pydicom.dcmread(p) for p in phi_site["pooled"]]
    original = [(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)) for ds in datasets]
    for ds in datasets:
        deidentify(ds, KEY)
    new_sops = [str(ds.SOPInstanceUID) for ds in datasets]
    for (sop, study), ds in zip(original, datasets):
        assert ds.SOPInstanceUID == KEY.uid(sop) == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.StudyInstanceUID == KEY.uid(study)
        assert UID(ds.SOPInstanceUID).is_valid and len(ds.SOPInstanceUID) <= 64
    for ds in datasets[1:]:  # each fixture image references the previous one
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID in new_sops
        assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID.startswith("1.2.840.10008.")
    assert datasets[0].StudyInstanceUID == datasets[4].StudyInstanceUID  # one study stays one study
    assert datasets[0].StudyInstanceUID != datasets[1].StudyInstanceUID


GE_CLASS, GE_REFERENCED_CLASS = "1.2.840.113619.4.30", "1.2.840.113619.4.27"  # a vendor's private SOP classes


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_private_class_and_coding_scheme_uids_stay_while_instance_uids_are_remapped(syntax):
    """A SOP Class UID names a kind of object, not a patient: remapped, a vendor's private class (outside the DICOM
    root) was no longer recognised by any viewer. Coding scheme, context group and mapping resource UIDs name
    registries. Instance UIDs, and the organisation that extended a context group, stay remapped."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = GE_CLASS
    ds.RelatedGeneralSOPClassUID = ds.OriginalSpecializedSOPClassUID = GE_REFERENCED_CLASS
    instance, creator = "1.2.826.0.1.3680043.8.498.4711", "1.2.826.0.1.3680043.8.498.99"
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = GE_REFERENCED_CLASS, instance
    ds.ReferencedSOPSequence = [reference]
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-D3000", "99GE", "Chest"
    region.CodingSchemeUID, region.ContextUID, region.MappingResourceUID = "1.2.840.113619.6.1", "1.2.840.113619.6.2", "1.2.840.113619.6.3"
    region.ContextGroupExtensionCreatorUID = creator
    ds.AnatomicRegionSequence = [region]
    ds.file_meta.PrivateInformationCreatorUID, ds.file_meta.PrivateInformation = "1.2.840.113619.6.9", b"GE"
    ds = _reread(ds, syntax)
    original = {k: str(ds[k].value) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    deidentify(ds, KEY)
    ds = _reread(ds)
    assert (ds.SOPClassUID, ds.file_meta.MediaStorageSOPClassUID) == (GE_CLASS, GE_CLASS)
    assert ds.RelatedGeneralSOPClassUID == ds.OriginalSpecializedSOPClassUID == GE_REFERENCED_CLASS
    assert ds.ReferencedSOPSequence[0].ReferencedSOPClassUID == GE_REFERENCED_CLASS
    region = ds.AnatomicRegionSequence[0]
    assert [region.CodingSchemeUID, region.ContextUID, region.MappingResourceUID] == [f"1.2.840.113619.6.{i}" for i in (1, 2, 3)]
    assert ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == KEY.uid(instance)
    assert region.ContextGroupExtensionCreatorUID == KEY.uid(creator)  # an organisation: U, as Table E.1-1 has its template twin
    assert {k: str(ds[k].value) for k in original} == {k: KEY.uid(v) for k, v in original.items()}
    assert "PrivateInformationCreatorUID" not in ds.file_meta and "PrivateInformation" not in ds.file_meta


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the point of the test
@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_a_class_attribute_holding_text_not_a_uid_is_remapped_not_kept(syntax):
    """Class UIDs stay as read only when they are UIDs: digits and dots leave no room for a name, any text may."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add(DataElement(0x0008001A, "UI", "SMITH^JOHN 1961", validation_mode=config.IGNORE))  # Related General SOP Class
    ds = _reread(ds, syntax)
    deidentify(ds, KEY)
    assert str(ds.RelatedGeneralSOPClassUID) == KEY.uid("SMITH^JOHN 1961")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


def test_marks_method_and_options():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientBirthDate = "19610203"
    deidentify(ds, KEY)
    assert ds.PatientIdentityRemoved == "YES"
    codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113107", "DCM"), ("113108", "DCM")]
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    assert ds.PatientSex == original.PatientSex and ds.PatientWeight == original.PatientWeight
    assert "PatientBirthDate" in ds and not ds.PatientBirthDate  # Z: age is what the pool retains

    plain = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    deidentify(plain, KEY, DeidOptions(modified_dates=False, retain_characteristics=()))
    assert [c.CodeValue for c in plain.DeidentificationMethodCodeSequence] == ["113100"]
    assert not plain.get("StudyDate") and not plain.get("AcquisitionDate") and not plain.get("PatientSex")
    with pytest.raises(ConfigError, match="cannot retain"):
        DeidOptions(retain_characteristics=("PatientName",))


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_an_earlier_deidentification_is_added_to_not_replaced(transfer_syntax):
    """PS3.15 E.1.1: an object de-identified twice says both; what the earlier sequence holds beyond CID 7050 codes is
    untrusted text and goes."""
    earlier = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    earlier.DeidentificationMethod = "Cleaned by Dr Jane Roe"
    earlier.DeidentificationMethodCodeSequence = []
    for value, scheme, meaning in [
        ("113100", "DCM", "Basic Application Confidentiality Profile"),
        ("113101", "DCM", "Cleaned by Dr Jane Roe"),
        ("99RO", "LOCAL", "Jane Roe's method"),
    ]:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        earlier.DeidentificationMethodCodeSequence.append(item)
    earlier.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    earlier.save_as(buffer, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    deidentify(ds, KEY, DeidOptions(modified_dates=False, retain_characteristics=()))
    codes = [(c.CodeValue, c.CodeMeaning) for c in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "Basic Application Confidentiality Profile"), ("113101", "Clean Pixel Data Option")]
    assert "Roe" not in str(ds.DeidentificationMethod)


def test_pseudonyms_and_date_shift_are_keyed():
    other = SiteKey(b"another-site-secret-0123456789ab")
    assert KEY.pseudonym("|MRN-1") == KEY.pseudonym("|MRN-1") != other.pseudonym("|MRN-1")
    assert KEY.uid("1.2.3.4") != other.uid("1.2.3.4")
    assert KEY.uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    shifts = {KEY.date_shift_days(f"|MRN-{i}") for i in range(50)}
    assert len(shifts) > 40 and all(1 <= s <= KEY.max_shift_days for s in shifts)
    a = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    b = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert deidentify(a, KEY).pseudonym == deidentify(b, KEY).pseudonym  # same patient, same run or not


def test_screen_sends_what_the_profile_cannot_clean_to_quarantine():
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    assert screen(ct) is None
    ct.BurnedInAnnotation = "YES"
    assert screen(ct).reason == "burned_in_annotation"
    sc = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"), stop_before_pixels=True)
    assert screen(sc).reason == "burned_in_annotation_unknown"
    sc.BurnedInAnnotation = "NO"
    assert screen(sc) is None
    assert screen(pydicom.dcmread(get_testdata_file("test-SR.dcm"))).reason == "unsafe_sop_class"
    anonymous = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    del anonymous.PatientID, anonymous.PatientName
    assert patient_key(anonymous) is None and screen(anonymous).reason == "no_patient_identity"


def test_site_secret_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDTRIAGE_SITE_SECRET", raising=False)
    with pytest.raises(ConfigError, match="no site secret") as err:
        load_site_key()
    assert "token_hex" in str(err.value)
    (tmp_path / "site.key").write_text("f" * 64 + "\n")
    (tmp_path / "site.key").chmod(0o600)
    assert load_site_key(tmp_path / "site.key").pseudonym("|x") == SiteKey(b"f" * 64).pseudonym("|x")
    monkeypatch.setenv("MEDTRIAGE_SITE_SECRET", "short")
    with pytest.raises(ConfigError, match="too short"):
        load_site_key()


def test_a_site_secret_that_other_users_can_read_is_refused(tmp_path):
    """With the secret, anyone can confirm which patient ID gave a pseudonym and undo the date shifts."""
    key = tmp_path / "site.key"
    key.write_text("f" * 64 + "\n")
    for mode in (0o644, 0o640, 0o604):
        key.chmod(mode)
        with pytest.raises(ConfigError, match="can be read by other users") as err:
            load_site_key(key)
        assert "chmod 600" in str(err.value)
    key.chmod(0o400)
    assert load_site_key(key).pseudonym("|x") == SiteKey(b"f" * 64).pseudonym("|x")


def test_dcmdump_reads_the_output(need_tool, tmp_path, phi_site):
    need_tool("dcmdump", "apt-get install dcmtk")
    for path in phi_site["pooled"]:
        ds = pydicom.dcmread(path)
        deidentify(ds, KEY)
        out = tmp_path / f"{path.name}.dcm"
        ds.save_as(out, enforce_file_format=True)
        dump = subprocess.run(["dcmdump", "-E", str(out)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "PatientIdentityRemoved" in dump.stdout


def test_io_modules_never_import_torch(run_without_training_stack):
    run = run_without_training_stack("import medtriage.io.deid, medtriage.io.ingest, medtriage.data.audit")
    assert run.returncode == 0, run.stderr
