"""Site ingest end to end on real files: a planted-PHI site export, the simulated 3-site pool, deid-data."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from medtriage.cli import main as cli_main
from medtriage.errors import ConfigError, InputError
from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_ledger import INDEX_FILE, ledger_folder
from medtriage.io.site_folder import SITE_LABELS_FILE
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site, decoded_pixels_sha256, identifying_values

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
ROOT = Path(__file__).resolve().parents[2]


def _snapshot(folder: Path, skip: str = "logs") -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and skip not in p.parts
    }


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    site = build_phi_site(root / "site")
    summary = ingest_site("site_a", root / "site", root / "pool", key=KEY, progress=False)
    return {
        "root": root,
        "site": site,
        "summary": summary,
        "pool": root / "pool" / "site_a",
        "quarantine": root / "pool-quarantine" / "site_a",
    }


def test_every_input_ends_in_exactly_one_place(ingested):
    summary, site = ingested["summary"], ingested["site"]
    assert summary.counts_in == len(site["pooled"]) + len(site["quarantined"])
    assert summary.counts_in == summary.pooled + sum(summary.quarantined.values())
    assert summary.pooled == len(site["pooled"]) == len(list(ingested["pool"].glob("*.dcm")))
    reasons = {Path(r["source"]).name: r["reason"] for r in _csv(ingested["quarantine"] / "quarantine.csv")}
    assert reasons == site["quarantined"]
    for name, reason in reasons.items():
        assert len(list((ingested["quarantine"] / reason).iterdir())) >= 1, name
    assert "in 10 = pooled 5 (5 new) + quarantined 5" in summary.line()


def test_no_identifying_value_anywhere_in_the_pool(ingested):
    values = identifying_values(ingested["site"]["pooled"])
    for path in sorted(ingested["pool"].rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".dcm":
                data = data.replace(pydicom.dcmread(path).PixelData, b"")
            leaked = [v for v in values if v.encode() in data]
            assert not leaked, f"{path.name}: {leaked}"
    assert str(ingested["root"]) not in Path(ingested["summary"].log_path).read_text()  # no paths in the audit log


def test_pixels_untouched_and_references_resolve(ingested):
    pooled = [pydicom.dcmread(p) for p in ingested["pool"].glob("*.dcm")]
    sources = [pydicom.dcmread(p) for p in ingested["site"]["pooled"]]
    # Decoded, not stored: de-identification drops comments inside compressed frames (a JPEG 2000 encoder's name).
    assert sorted(decoded_pixels_sha256(ds) for ds in pooled) == sorted(decoded_pixels_sha256(ds) for ds in sources)
    sops = {str(ds.SOPInstanceUID) for ds in pooled}
    references = [item.ReferencedSOPInstanceUID for ds in pooled for item in ds.get("ReferencedImageSequence", [])]
    assert len(references) == 4 and set(references) <= sops
    assert len({str(ds.StudyInstanceUID) for ds in pooled}) == 3
    for ds in pooled:
        assert ds.PatientIdentityRemoved == "YES" and ds.SOPInstanceUID.startswith("2.25.")
        assert not [e for e in ds.iterall() if e.tag.is_private]


def test_dcmdump_reads_every_pooled_file_without_complaint(need_tool, ingested):
    need_tool("dcmdump", "apt-get install dcmtk")
    """An independent parser on the files exactly as ingest wrote them: no damage, nothing to correct."""
    for path in sorted(ingested["pool"].glob("*.dcm")):
        dump = subprocess.run(["dcmdump", "-E", "-dc", str(path)], capture_output=True, text=True)
        assert dump.returncode == 0 and not dump.stderr.strip(), f"{path.name}: {dump.stderr}"
        assert "FileMetaInformationGroupLength" in dump.stdout and "PatientIdentityRemoved" in dump.stdout


def test_labels_follow_the_new_uids_and_bad_rows_are_counted(ingested):
    rows = _csv(ingested["pool"] / SITE_LABELS_FILE)
    assert rows and set(rows[0]) == {"sop_instance_uid", "accession_number", "finding"}  # free-text column stays home
    site_rows = {r["sop_instance_uid"]: r["finding"] for r in _csv(ingested["root"] / "site" / SITE_LABELS_FILE)}
    pooled_sops = {str(pydicom.dcmread(p).SOPInstanceUID) for p in ingested["pool"].glob("*.dcm")}
    for row in rows:
        assert row["sop_instance_uid"] in pooled_sops
        original = next(uid for uid in site_rows if KEY.uid(uid) == row["sop_instance_uid"])
        assert row["finding"] == site_rows[original] != ""
    counts = json.loads(Path(ingested["summary"].log_path).read_text())["labels"]
    assert counts["rows_empty_label"] == 1 and counts["rows_matching_no_pooled_image"] == 1
    assert counts["images_labelled"] == len(rows) == 4


def test_audit_log_records_profile_counts_and_versions(ingested):
    log = json.loads(Path(ingested["summary"].log_path).read_text())
    assert log["counts"]["in"] == log["counts"]["pooled"] + log["counts"]["quarantined_total"] == 10
    assert log["deidentification"]["options"] == [
        "Retain Longitudinal Temporal Information Modified Dates Option",
        "Retain Patient Characteristics Option",
    ]
    assert log["software"]["medtriage"] and log["software"]["table"].startswith("dicom-anonymizer")
    assert log["started_utc"] and log["seconds"] >= 0


def test_ingesting_twice_changes_nothing(ingested, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(ingested["root"] / "pool", pool)
    before = _snapshot(pool)
    again = ingest_site("site_a", ingested["root"] / "site", pool, key=KEY, quarantine=tmp_path / "q", progress=False)
    assert _snapshot(pool) == before
    assert again.pooled_new == 0 and again.pooled == 5 and sum(again.quarantined.values()) == 5
    assert not (tmp_path / "q").exists()  # nothing new to quarantine either
    assert len(list((ledger_folder(pool, "site_a") / "logs").glob("*.json"))) == 2  # one log per ingest


def test_incremental_ingest_adds_only_new_files(tmp_path):
    site = build_phi_site(tmp_path / "site")
    held_back = tmp_path / "later"
    shutil.move(tmp_path / "site" / "zz_more", held_back)
    first = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert first.pooled_new == 5 and not first.quarantined
    before = _snapshot(tmp_path / "pool" / "site_a")
    assert before and not [name for name in before if not name.endswith(".dcm") and name != SITE_LABELS_FILE]
    shutil.move(held_back, tmp_path / "site" / "zz_more")
    second = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert second.pooled_new == 0 and second.pooled == 5
    assert dict(second.quarantined) == {r: 1 for r in site["quarantined"].values()}
    assert _snapshot(tmp_path / "pool" / "site_a") == before  # pooled files and labels untouched
    assert len(_csv(ledger_folder(tmp_path / "pool", "site_a") / INDEX_FILE)) == 10


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        ("sop_instance_uid,finding\n1.2.3,épanchement\n".encode("latin-1"), InputError, "not UTF-8 text"),
        (b"sop_instance_uid,comment\n1.2.3,none\n", ConfigError, "needs a label column"),
        (b'sop_instance_uid,finding\n1.2.3,"' + b"x" * 200_000 + b'"\n', InputError, "cannot be read as CSV"),
    ],
)
def test_an_unusable_labels_file_stops_the_ingest_before_anything_is_pooled(tmp_path, labels, error, message):
    build_phi_site(tmp_path / "site")
    (tmp_path / "site" / SITE_LABELS_FILE).write_bytes(labels)
    with pytest.raises(error, match=message) as raised:
        ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert raised.value.where == str((tmp_path / "site" / SITE_LABELS_FILE).resolve())
    assert not (tmp_path / "pool").exists() or not list((tmp_path / "pool").rglob("*.dcm"))


def test_same_image_at_two_sites_is_flagged(ingested, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(ingested["root"] / "pool", pool)
    other = ingest_site(
        "site_b",
        ingested["root"] / "site",
        pool,
        key=SiteKey(b"site-b-secret-0123456789abcdefgh"),
        quarantine=tmp_path / "q",
        progress=False,
    )
    assert other.pooled_new == 5
    flags = [r["flag"] for r in _csv(ledger_folder(pool, "site_b") / INDEX_FILE) if r["outcome"] == "pooled"]
    assert all(f.startswith("identical_pixels:site_a/") for f in flags)
    assert other.flags["identical_pixels"] == 5


@pytest.mark.slow
def test_worker_processes_and_full_decode_give_the_same_pool(ingested, tmp_path):
    summary = ingest_site("site_a", ingested["root"] / "site", tmp_path / "pool", key=KEY, workers=2, verify_pixels=True, progress=False)
    assert summary.line() == ingested["summary"].line()
    ours = {k: v for k, v in _snapshot(tmp_path / "pool").items() if not k.endswith(INDEX_FILE)}
    theirs = {k: v for k, v in _snapshot(ingested["root"] / "pool").items() if not k.endswith(INDEX_FILE)}
    assert ours == theirs


def test_simulated_sites_ingest_with_their_labels(tmp_path):
    make_sites = pytest.importorskip("medtriage.data.simulate.sites").make_sites
    results = make_sites(ROOT / "data/samples/pneumoniamnist_28.npz", tmp_path / "sites", seed=0, limit=24)
    for i, result in enumerate(results):
        source = tmp_path / "sites" / result.site
        values = identifying_values([p for p in source.glob("*.dcm") if p.name not in result.stray_files])
        summary = ingest_site(result.site, source, tmp_path / "pool", key=SiteKey(bytes([65 + i]) * 32), progress=False)
        assert summary.counts_in == len(list(source.glob("*.dcm")))
        assert summary.pooled == result.images and sum(summary.quarantined.values()) == len(result.stray_files)
        blob = b"".join(p.read_bytes() for p in (tmp_path / "pool" / result.site).rglob("*") if p.is_file())
        assert not [v for v in values if v.encode() in blob]
        labels = _csv(tmp_path / "pool" / result.site / SITE_LABELS_FILE)
        assert labels and list(labels[0]) == next(csv.reader(open(source / SITE_LABELS_FILE)))  # same shape


def test_deid_data_package_ingests_and_quarantines_by_reason(tmp_path):
    source = Path(__import__("deid_data").__file__).parent / "data"
    summary = ingest_site("deid_data", source, tmp_path / "pool", key=KEY, progress=False)
    assert summary.counts_in == summary.pooled + sum(summary.quarantined.values())
    assert summary.pooled == 1  # cat.dcm: a DX with BurnedInAnnotation=NO; the rest cannot be made safe
    assert summary.quarantined["burned_in_annotation"] == 2 and summary.quarantined["burned_in_annotation_unknown"] == 10
    assert summary.quarantined["not_dicom"] >= 3  # README, zips, python files


def test_cli_ingest_refuses_a_secret_inside_the_pool_and_reports_counts(tmp_path, capsys, monkeypatch):
    build_phi_site(tmp_path / "site")
    pool = tmp_path / "pool"
    (pool).mkdir()
    (pool / "site.key").write_text("s" * 64)
    assert cli_main(["ingest", str(tmp_path / "site"), "--site", "a", "--into", str(pool), "--secret-file", str(pool / "site.key")]) == 2
    assert "must not live inside the pool" in capsys.readouterr().err
    monkeypatch.setenv("MEDTRIAGE_SITE_SECRET", "e" * 64)
    assert cli_main(["ingest", str(tmp_path / "site"), "--site", "a", "--into", str(pool), "--workers", "1"]) == 0
    assert "a: in 10 = pooled 5 (5 new) + quarantined 5" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="inside the pool"):
        ingest_site("a", tmp_path / "site", pool, key=KEY, quarantine=pool / "q", progress=False)


def test_byte_identical_copy_and_vanished_sources_keep_the_counts(tmp_path):
    site = build_phi_site(tmp_path / "site")
    shutil.copyfile(site["pooled"][0], tmp_path / "site" / "copy_of_first")
    first = ingest_site("a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert first.quarantined["duplicate_file"] == 1 and first.counts_in == 11
    assert first.counts_in == first.pooled + sum(first.quarantined.values())
    site["pooled"][1].unlink()  # a file the site no longer exports stays pooled, but is no input now
    again = ingest_site("a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert again.counts_in == 10 == again.pooled + sum(again.quarantined.values()) and again.pooled_new == 0


def test_a_full_decode_refuses_an_image_claiming_more_than_the_decode_limits_before_decoding(tmp_path):
    """--verify-pixels decodes every image: a small JPEG whose header claims 60000 x 60000 pixels is quarantined as
    too large from its header, not handed to a decoder that would allocate 10 GB for it."""
    import tracemalloc

    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.Rows = ds.Columns = 60000
    ds.BurnedInAnnotation = "NO"  # a secondary capture is screened for burned-in text first
    (tmp_path / "site").mkdir()
    ds.save_as(tmp_path / "site" / "huge.dcm")
    tracemalloc.start()
    try:
        summary = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, workers=1, verify_pixels=True, progress=False)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert dict(summary.quarantined) == {"too_large": 1} and summary.pooled == 0
    assert peak < 1e9


def test_an_ingest_logged_to_a_file_shows_plain_progress_lines_without_redraws(tmp_path, capsys):
    """A nightly ingest writes its progress to a log: plain lines, not a bar's carriage-return redraws."""
    build_phi_site(tmp_path / "site")
    ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=True)
    logged = capsys.readouterr().err  # stderr captured, as a log file holds it: not a terminal
    assert "\r" not in logged
    assert logged.splitlines()[-1].startswith("ingest site_a: 10/10 files (100%) in ")
