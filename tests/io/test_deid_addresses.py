"""Addresses (VR UR) in a de-identified object: a Retrieve URL or URI, a Storage URL, a Pixel Data Provider URL, a
contact or file URI. Before, the profile kept them with only the UIDs in them remapped: the host named the site's PACS
and a query could carry a Patient ID, while the pool has no such server to reach. They go at any depth, whatever VR
the file gave them (implicit VR files give none), and a private or unknown element that holds one goes as those do.
What the table lists keeps its action (Selector UR Value: a dummy)."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from medtriage.io.deid import deidentify
from medtriage.io.site_key import SiteKey
from tests.io.test_deid_edges import _reread

KEY = SiteKey(b"addresses-secret-0123456789abcdef")
HOST, MRN = "pacs.st-elsewhere.org", "MRN-4711"
ADDRESSES = ("RetrieveURL", "RetrieveURI", "StorageURL", "PixelDataProviderURL", "ContactURI", "FileAccessURI")


def _address(study: str, kind: str) -> str:
    return f"https://{HOST}/{kind}?patientID={MRN}&studyUID={study}"


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_addresses() -> Dataset:
    """A file with every address at the top level, and a Retrieve URL in a referenced series and in an instance of it
    (as a Key Object Selection's references carry them)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study = str(ds.StudyInstanceUID)
    for keyword in ADDRESSES:
        setattr(ds, keyword, _address(study, keyword))
    instance = Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    instance.RetrieveURL = _address(study, "instance")
    series = Dataset()
    series.SeriesInstanceUID, series.RetrieveURL = ds.SeriesInstanceUID, _address(study, "series")
    series.ReferencedSOPSequence = [instance]
    ds.ReferencedSeriesSequence = [series]
    return ds


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_addresses_are_removed_at_any_depth(syntax):
    ds = _reread(_with_addresses(), syntax)
    series_uid = str(ds.SeriesInstanceUID)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert HOST.encode() not in data and MRN.encode() not in data
    ds = pydicom.dcmread(io.BytesIO(data))
    assert not [keyword for keyword in ADDRESSES if keyword in ds]
    series = ds.ReferencedSeriesSequence[0]
    assert "RetrieveURL" not in series and "RetrieveURL" not in series.ReferencedSOPSequence[0]
    assert series.SeriesInstanceUID == ds.SeriesInstanceUID == KEY.uid(series_uid)  # the references themselves stay
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_an_address_the_file_gave_another_vr_is_removed_too():
    """The attribute says it is an address, whatever VR a writer gave it (UT, or UN for an attribute it did not know)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add(DataElement(0x00081190, "UT", _address("1", "as-ut")))  # Retrieve URL
    ds.add(DataElement(0x0040E010, "UN", _address("1", "as-un").encode()))  # Retrieve URI
    ds = _reread(ds)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert HOST.encode() not in data and MRN.encode() not in data


def test_private_and_unknown_addresses_are_removed():
    """An address in a private element, or in a public one pydicom does not know, goes as those elements do."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.private_block(0x0029, "ACME PACS", create=True).add_new(0x01, "UR", _address("1", "private"))
    ds.add(DataElement(0x0008119F, "UR", _address("1", "unknown")))  # no such public attribute
    ds = _reread(ds)
    deidentify(ds, KEY)
    assert HOST.encode() not in _saved(ds)


def test_an_address_the_table_lists_keeps_its_action():
    """Selector UR Value is D in Table E.1-1: a dummy, not removed."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SelectorURValue = _address("1", "selector")
    deidentify(ds, KEY)
    assert ds.SelectorURValue == "ANONYMIZED"
