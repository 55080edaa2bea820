"""Who a patient is, from ingest to the leakage audit: padding is not identity, an image without a Patient ID is
refused rather than lumped with every other anonymous image, and one unreadable file costs only itself."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtriage.data.audit import audit_manifest
from medtriage.data.manifest import PoolWriter
from medtriage.data.pool import build_sites_pool, decode_file
from medtriage.data.splits import assign_splits, patient_identity
from medtriage.errors import InputError
from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_ledger import INDEX_FILE, ledger_folder
from medtriage.io.site_key import SiteKey
from tests.io.test_clamped import claiming_file

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
PAIRS = 24  # patients with one padded and one unpadded image: by chance all pairs share a split ~ 0.5 ** 24


def _write_site(folder: Path, patient_ids: list[str | None]) -> list[Path]:
    """One CT image per entry (None: no PatientID element), and a labels.csv alternating the findings by image."""
    folder.mkdir(parents=True)
    paths, rows = [], []
    for i, patient_id in enumerate(patient_ids):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        if patient_id is None:
            del ds.PatientID
        else:
            ds.PatientID = patient_id
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[folder.name, str(i)])
        paths.append(folder / f"IM{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
        rows.append({"sop_instance_uid": ds.SOPInstanceUID, "finding": "pneumonia" if i % 4 < 2 else "normal"})
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sop_instance_uid", "finding"])
        writer.writeheader()
        writer.writerows(rows)
    return paths


def _padded_pairs() -> list[str]:
    """Each patient twice: as the site pads it (leading and trailing spaces) and bare; case is kept apart."""
    return [pid for i in range(PAIRS) for pid in (f"  Mrn{i} ", f"Mrn{i}")]


def test_a_padded_patient_id_is_one_patient_in_the_pool_and_one_split(tmp_path):
    _write_site(tmp_path / "sites" / "site_a", _padded_pairs())
    manifest = build_sites_pool(tmp_path / "sites", tmp_path / "pool", workers=1, verbose=False)
    rows = manifest.rows
    assert len(rows) == 2 * PAIRS and sorted(set(rows["patient_id"])) == sorted(f"Mrn{i}" for i in range(PAIRS))
    assert (rows.groupby("patient_id")["split"].nunique() == 1).all()
    assert not [f for f in audit_manifest(manifest, check_images=False).findings if f.kind == "patient_in_two_splits"]


def test_splits_keep_padded_and_bare_ids_of_one_patient_together():
    rows = [{"site": "a", "patient_id": pid, "label": i // 2 % 2} for i, pid in enumerate(_padded_pairs())]
    splits = assign_splits(rows, 0.3, 0.3, seed=0)
    assert all(splits[i] == splits[i + 1] for i in range(0, len(rows), 2))
    assert patient_identity("a", " MRN1 ") == patient_identity("a", "MRN1") == ("a", "MRN1")
    assert patient_identity("a", "mrn1") != patient_identity("a", "MRN1")  # case is part of an LO value
    assert patient_identity("a", "MRN1") != patient_identity("b", "MRN1")  # IDs are a site's own namespace


def test_the_audit_sees_a_padded_id_in_another_split_as_the_same_patient(tmp_path):
    writer = PoolWriter(tmp_path, ["normal", "pneumonia"])
    pixels = np.zeros((1, 4, 4), np.float32)
    for n, (patient, split, label) in enumerate([("P1", "train", 0), ("P1 ", "train", 1), (" P1", "test", 1), ("P2", "test", 0)]):
        uid = f"u{n}"
        writer.add(pixels + n, site="a", patient_id=patient, study_uid=uid, series_uid=uid, sop_uid=uid, path=uid, label=label, split=split)
    findings = {f.kind: f for f in audit_manifest(writer.close(), check_images=False).findings}
    leak = findings["patient_in_two_splits"]
    assert leak.count == 1 and leak.examples == [{"site": "a", "patient_id": "P1", "splits": ["test", "train"]}]


def test_ingest_gives_a_padded_patient_id_the_same_pseudonym(tmp_path):
    _write_site(tmp_path / "site", [" Mrn7  ", "Mrn7", "mrn7"])
    ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    with open(ledger_folder(tmp_path / "pool", "site_a") / INDEX_FILE, newline="") as f:
        patients = [row["patient"] for row in sorted(csv.DictReader(f), key=lambda r: r["path"]) if row["outcome"] == "pooled"]
    assert len(patients) == 3 and len(set(patients)) == 2  # the padded and bare IDs are one; another case is another


def test_images_without_a_patient_id_are_rejected_with_their_reason_not_lumped(tmp_path):
    ids = [f"Mrn{i}" for i in range(8)] + [None, "", "   ", None]
    _write_site(tmp_path / "sites" / "site_a", ids)
    manifest = build_sites_pool(tmp_path / "sites", tmp_path / "pool", workers=1, verbose=False)
    assert len(manifest.rows) == 8 and set(manifest.rows["patient_id"]) == {f"Mrn{i}" for i in range(8)}
    reasons = manifest.rejects["reason"]
    assert len(manifest.rejects) == 4 and reasons.str.startswith("no Patient ID in the header").all()
    assert "no Patient ID in the header" in manifest.summary()


@pytest.fixture
def unreadable(monkeypatch):
    """Paths whose reads fail as a file without read permission does (the tests run as root, where chmod does not)."""
    paths: set[Path] = set()
    real = Path.open

    def open_(self, *args, **kwargs):
        if self in paths:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    return paths


def test_an_unreadable_file_is_listed_and_every_other_file_is_still_ingested(tmp_path, unreadable):
    paths = _write_site(tmp_path / "site", ["Mrn1", "Mrn2", "Mrn3"])
    unreadable.add(paths[0])
    quarantine = tmp_path / "quarantine"
    summary = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, quarantine=quarantine, progress=False)
    assert (summary.counts_in, summary.pooled, dict(summary.quarantined)) == (3, 2, {"cannot_read": 1})
    assert "cannot_read 1" in summary.line()
    with open(quarantine / "quarantine.csv", newline="") as f:
        listed = list(csv.DictReader(f))
    assert [(r["source"], r["reason"]) for r in listed] == [(str(paths[0]), "cannot_read")]
    assert "Permission denied" in listed[0]["detail"]
    assert not (quarantine / "cannot_read").exists()  # nothing was read, so nothing was copied

    unreadable.clear()  # the site fixes the permissions: the next run picks the file up
    again = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, quarantine=quarantine, progress=False)
    assert (again.pooled, again.pooled_new, dict(again.quarantined)) == (3, 1, {})


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the length it cannot honour
def test_the_pool_builder_never_allocates_what_a_rejected_file_claims(tmp_path):
    (tmp_path / "site_a").mkdir()
    path = claiming_file(tmp_path / "site_a" / "claim.dcm", before_pixels=True)  # a header element claims 4 GB
    tracemalloc.start()
    try:
        decoded = decode_file((str(tmp_path), "site_a", "site_a/claim.dcm"))
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert decoded.error and decoded.fields["sop_uid"]  # rejected, its identifiers still read for the label join
    assert peak < 50e6, f"allocated {peak / 1e9:.2f} GB for a {path.stat().st_size / 1e3:.0f} KB file"


def test_a_pool_whose_site_was_ingested_under_two_patient_keying_rules_is_not_built(tmp_path):
    """Ingest refuses a second rule now; a pool ingested before it could still hold one, which its logs show."""
    _write_site(tmp_path / "site", [f"Mrn{i}" for i in range(8)])
    ingest_site("site_a", tmp_path / "site", tmp_path / "ingested", key=KEY, progress=False)
    assert len(build_sites_pool(tmp_path / "ingested", tmp_path / "pool", workers=1, verbose=False).rows) == 8
    (log,) = (ledger_folder(tmp_path / "ingested", "site_a") / "logs").glob("*.json")
    older = json.loads(log.read_text())
    del older["deidentification"]["patient_identity"]  # as an ingest that keyed on issuer and ID logged it
    (log.parent / "20200101T000000000000Z.json").write_text(json.dumps(older))
    with pytest.raises(InputError, match="two pseudonyms") as refused:
        build_sites_pool(tmp_path / "ingested", tmp_path / "pool", workers=1, verbose=False)  # the cached pool too
    assert "into a new pool" in refused.value.hint
