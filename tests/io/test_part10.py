"""The quick Part 10 encoder writes exactly what pydicom writes, on every test file we have."""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file

from medtriage.io.deid import deidentify
from medtriage.io.part10 import _encoded_as_read, encode
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
DEID_DATA = Path(__import__("deid_data").__file__).parent / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """pydicom's test files (every encoding, undefined lengths, nested sequences), deid-data and the PHI site."""
    site = build_phi_site(tmp_path_factory.mktemp("site"))
    return [*_pydicom_test_files(), *map(str, sorted(DEID_DATA.rglob("*.dcm"))), *map(str, site["pooled"])]


def _pydicom_test_files() -> list[str]:
    """pydicom's and pydicom-data's files, from disk (`get_testdata_files` would try the network)."""
    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    store = importlib.util.find_spec("data_store")
    if store and store.origin:
        folders.append(Path(store.origin).parent / "data")
    return sorted(
        str(p) for folder in folders for p in folder.rglob("*") if p.is_file() and p.stat().st_size < 2_000_000
    )  # big files add time, not cases


def _pydicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _read(path: str):
    try:
        return pydicom.dcmread(path)
    except Exception:
        return None  # not DICOM, or a file pydicom's own tests expect to fail


@pytest.mark.parametrize("deidentified", [False, True], ids=["as_read", "deidentified"])
def test_encode_matches_pydicom_byte_for_byte(corpus, deidentified):
    compared = quick = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about odd values in its own test files
        for path in corpus:
            ours, theirs = _read(path), _read(path)
            if ours is None:
                continue
            if deidentified:
                try:
                    deidentify(theirs, KEY)
                except Exception:
                    continue  # no patient to key a pseudonym on: such files are quarantined, never written
                deidentify(ours, KEY)
            try:
                expected = _pydicom_bytes(theirs)
            except Exception:
                with pytest.raises(Exception):  # noqa: B017 -- whatever pydicom refuses, ours must refuse too
                    encode(ours)
                continue
            quick += _encoded_as_read(ours)
            assert encode(ours) == expected, path
            compared += 1
    assert compared > 120 and quick > 100  # most files take the quick path, the rest pydicom's


def test_encode_leaves_the_data_set_and_its_file_meta_as_they_were():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.file_meta.FileMetaInformationVersion
    meta_before = list(ds.file_meta.keys())
    data = encode(ds)
    assert list(ds.file_meta.keys()) == meta_before
    again = pydicom.dcmread(io.BytesIO(data))
    assert data[:132] == ds.preamble + b"DICM" and again.file_meta.FileMetaInformationVersion == b"\0\1"
    first_element = data.index(b"\x08\x00\x05\x00CS")  # (0008,0005), the data set's first element
    assert again.file_meta.FileMetaInformationGroupLength == first_element - 132 - 12


def test_missing_required_file_meta_is_refused_as_pydicom_does():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SOPClassUID, ds.file_meta.MediaStorageSOPClassUID
    with pytest.raises(AttributeError, match="Media Storage SOP Class UID"):
        encode(ds)
