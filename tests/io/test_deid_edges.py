"""Edges of de-identification and site ingest on real files: placeholder dates near year 1 under the per-patient
date shift, and site, pool and quarantine folders nested in one another (a rerun must not ingest its own output,
and identifiable originals must never sit inside the pool)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

from medtriage.cli import main as cli_main
from medtriage.errors import ConfigError
from medtriage.io.deid import deidentify
from medtriage.io.ingest import ingest_site, ingest_sites
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site

KEY = SiteKey(b"test-site-secret-0123456789abcdef")


def _reread(ds: pydicom.Dataset, syntax=None) -> pydicom.Dataset:
    """`ds` written and read back (optionally in another transfer syntax), so its elements start undecoded."""
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_dates_near_year_one_are_emptied_or_written_with_four_digit_years(syntax):
    """0001-01-01 is the placeholder many systems write for 'no date' (.NET DateTime.MinValue): shifting it back
    cannot give a date, so it is emptied, not left to abort the file. Years below 1000 keep four digits."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ContentDate, ds.AcquisitionDateTime, ds.InstanceCreationDate = "00010101", "00010101120000", "09991231"
    ds = _reread(ds, syntax)
    result = deidentify(ds, KEY)
    assert ds.ContentDate == "" and ds.AcquisitionDateTime == ""
    shifted = str(ds.InstanceCreationDate)
    assert len(shifted) == 8 and shifted.startswith("09"), shifted
    assert pydicom.valuerep.DA(shifted) is not None and result.date_shift_days >= 1


def _nested_layouts(root: Path) -> list[dict]:
    site = root / "site"
    return [
        dict(src=site, pool=site / "pool"),  # pool inside the site folder
        dict(src=site, pool=site),  # the same folder
        dict(src=root / "pool" / "raw", pool=root / "pool"),  # the site's originals inside the pool
        dict(src=site, pool=root / "pool", quarantine=site / "quarantine"),  # quarantine inside the site folder
    ]


@pytest.mark.parametrize("layout", range(4), ids=["pool_in_site", "same_folder", "site_in_pool", "quarantine_in_site"])
def test_nested_site_pool_and_quarantine_folders_are_refused_before_anything_is_written(tmp_path, layout):
    folders = _nested_layouts(tmp_path)[layout]
    build_phi_site(folders["src"])
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match="must not"):
        ingest_site("site_a", folders["src"], folders["pool"], key=KEY, quarantine=folders.get("quarantine"), progress=False)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_a_rerun_into_a_separate_pool_adds_no_image_twice(tmp_path):
    """The layout the checks allow: a second run pools nothing new and every image exactly once."""
    build_phi_site(tmp_path / "site")
    first = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    again = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert again.counts_in == first.counts_in and again.pooled_new == 0 and again.pooled == first.pooled
    assert len(list((tmp_path / "pool" / "site_a").glob("*.dcm"))) == first.pooled


def test_a_secret_kept_in_the_site_folder_is_refused_not_copied_to_quarantine(tmp_path, capsys):
    """A key saved next to the export would otherwise be read as an input, quarantined as not DICOM and copied,
    with its path listed, into the folder people review."""
    build_phi_site(tmp_path / "site")
    secret = tmp_path / "site" / "site.key"
    secret.write_text("s" * 64 + "\n")
    code = cli_main(["ingest", str(tmp_path / "site"), "--site", "a", "--into", str(tmp_path / "pool"), "--secret-file", str(secret)])
    assert code == 2 and "site folder" in capsys.readouterr().err
    copies = [p for p in tmp_path.rglob("*") if p.is_file() and p != secret and p.read_bytes() == secret.read_bytes()]
    assert not copies


def test_a_pool_among_the_site_folders_is_refused_before_any_site_is_ingested(tmp_path):
    """The pool would be read as one more site; found at its turn, the sites before it would already be pooled."""
    for site in ("site_a", "site_b"):
        build_phi_site(tmp_path / "sites" / site)
    pool = tmp_path / "sites" / "site_c_pool"
    with pytest.raises(ConfigError, match="must not be inside one another"):
        ingest_sites(tmp_path / "sites", pool, create_keys=True, progress=False)
    assert not pool.exists() and not (tmp_path / "sites" / ".keys").exists()
