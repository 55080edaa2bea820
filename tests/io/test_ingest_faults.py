"""kill -9 in the middle of an ingest: no partial file in the pool, and a rerun ends with the same pool as
an uninterrupted run."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom

from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_ledger import INDEX_FILE, ledger_folder
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site

SECRET = b"test-site-secret-0123456789abcdef"
# Runs ingest in a child that SIGKILLs itself half-way through writing its third pooled file.
KILLED_INGEST = textwrap.dedent(f"""
    import os, signal, sys
    from pathlib import Path
    import medtriage.io.ingest as ingest
    import medtriage.io.ingest_ledger as ledger
    from medtriage.io.site_key import SiteKey

    real, writes = ledger.write_pooled, []

    def dying_write(path, data):
        if Path(path).suffix == ".dcm" and len(writes) == 2:
            partial = Path(path).with_name("." + Path(path).name + ".0.partial")
            partial.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        writes.append(path)
        return real(path, data)

    ledger.write_pooled = dying_write
    src, pool, quarantine = sys.argv[1:4]
    ingest.ingest_site("site_a", src, pool, key=SiteKey({SECRET!r}), quarantine=quarantine, progress=False)
""")


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    """A ledger's rows without the run that wrote them (which differs by design)."""
    with open(path, newline="") as f:
        return sorted(({k: v for k, v in row.items() if k != "run"} for row in csv.DictReader(f)), key=lambda row: row["content_key"])


def test_killed_ingest_leaves_no_partial_file_and_a_rerun_completes_the_same_pool(tmp_path):
    build_phi_site(tmp_path / "site")
    key = SiteKey(SECRET)
    ingest_site("site_a", tmp_path / "site", tmp_path / "whole", key=key, quarantine=tmp_path / "q-whole", progress=False)

    killed = subprocess.run(
        [sys.executable, "-c", KILLED_INGEST, str(tmp_path / "site"), str(tmp_path / "pool"), str(tmp_path / "q")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    site_dir = tmp_path / "pool" / "site_a"
    pooled = [p.name for p in site_dir.iterdir() if not p.name.startswith(".")]
    assert len([n for n in pooled if n.endswith(".dcm")]) == 2  # the kill came during the third
    assert [p.name for p in site_dir.glob(".*.partial")]  # what a kill leaves, under a hidden temporary name only

    summary = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=key, quarantine=tmp_path / "q", progress=False)
    assert summary.pooled == 5 and not list(site_dir.glob(".*"))
    assert _tree(site_dir) == _tree(tmp_path / "whole" / "site_a")
    assert _rows(ledger_folder(tmp_path / "pool", "site_a") / INDEX_FILE) == _rows(ledger_folder(tmp_path / "whole", "site_a") / INDEX_FILE)
    quarantined, whole = _tree(tmp_path / "q"), _tree(tmp_path / "q-whole")
    assert quarantined.pop("quarantine.csv") and whole.pop("quarantine.csv") and quarantined == whole
    assert _rows(tmp_path / "q" / "quarantine.csv") == _rows(tmp_path / "q-whole" / "quarantine.csv")


def _ingested_alike(tmp_path) -> tuple[SiteKey, Path, Path]:
    """One site ingested into `whole` (what an uninterrupted run leaves) and into `pool` (which a test then damages as
    a kill would): the key, `pool` and its index."""
    build_phi_site(tmp_path / "site")
    key = SiteKey(SECRET)
    ingest_site("site_a", tmp_path / "site", tmp_path / "whole", key=key, quarantine=tmp_path / "q-whole", progress=False)
    pool = tmp_path / "pool"
    ingest_site("site_a", tmp_path / "site", pool, key=key, quarantine=tmp_path / "q", progress=False)
    return key, pool, ledger_folder(pool, "site_a") / INDEX_FILE


def test_a_row_torn_by_a_kill_is_dropped_and_its_input_processed_again(tmp_path):
    key, pool, index = _ingested_alike(tmp_path)
    lines = index.read_text().splitlines(keepends=True)
    at = max(i for i, line in enumerate(lines) if ",pooled," in line)  # the kill came while writing this row
    pooled_name = lines[at].split(",")[9]
    index.write_text("".join(lines[:at]) + lines[at][: len(lines[at]) // 2])
    (pool / "site_a" / pooled_name).unlink()  # and its file, as if the rename had not happened either
    summary = ingest_site("site_a", tmp_path / "site", pool, key=key, quarantine=tmp_path / "q", progress=False)
    assert summary.pooled == 5 and index.read_text().endswith("\n")
    assert _tree(pool / "site_a") == _tree(tmp_path / "whole" / "site_a")
    assert _rows(index) == _rows(ledger_folder(tmp_path / "whole", "site_a") / INDEX_FILE)


def test_a_source_changed_or_removed_after_it_was_read_is_listed_and_read_again_by_the_next_run(tmp_path, monkeypatch):
    """An export still being written or cleaned up: the quarantine copy is never of other bytes than those judged (and
    named by their key), a vanished source does not stop the run, and neither is indexed, so the next run reads it."""
    import medtriage.io.ingest as ingest

    build_phi_site(tmp_path / "site")
    more, key, judged = tmp_path / "site" / "zz_more", SiteKey(SECRET), ingest.process_file

    def exported_meanwhile(source: str):
        out = judged(source)
        if Path(source).name == "truncated.dcm":
            Path(source).unlink()
        elif Path(source).name == "burned.dcm":  # reviewed and written again, without burned-in text
            ds = pydicom.dcmread(source)
            ds.BurnedInAnnotation = "NO"
            ds.save_as(source, enforce_file_format=True)
        return out

    monkeypatch.setattr(ingest, "process_file", exported_meanwhile)
    first = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=key, quarantine=tmp_path / "q", progress=False)
    assert first.quarantined["changed_while_read"] == 2 and first.counts_in == first.pooled + sum(first.quarantined.values())
    assert not (tmp_path / "q" / "truncated").exists() and not (tmp_path / "q" / "burned_in_annotation").exists()
    with open(tmp_path / "q" / "quarantine.csv", newline="") as f:
        listed = {Path(row["source"]).name: row for row in csv.DictReader(f)}
    assert "ingest again" in listed["truncated.dcm"]["detail"] and listed["burned.dcm"]["reason"] == "changed_while_read"

    monkeypatch.undo()
    again = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=key, quarantine=tmp_path / "q", progress=False)
    assert again.pooled_new == 1 and (more / "burned.dcm").exists() and "changed_while_read" not in again.quarantined


def test_a_kill_between_listing_a_quarantined_file_and_indexing_it_does_not_list_it_twice(tmp_path):
    """The quarantine row is written before the index row that marks its input done: a kill between the two leaves the
    input to be read again, and the rerun finds it listed already."""
    key, pool, index = _ingested_alike(tmp_path)
    lines = index.read_text().splitlines(keepends=True)
    at = max(i for i, line in enumerate(lines) if ",quarantined," in line)  # the kill came before this row
    index.write_text("".join(lines[:at] + lines[at + 1 :]))
    summary = ingest_site("site_a", tmp_path / "site", pool, key=key, quarantine=tmp_path / "q", progress=False)
    assert summary.counts_in == summary.pooled + sum(summary.quarantined.values()) and summary.pooled_new == 0
    assert _rows(tmp_path / "q" / "quarantine.csv") == _rows(tmp_path / "q-whole" / "quarantine.csv")
    assert _rows(index) == _rows(ledger_folder(tmp_path / "whole", "site_a") / INDEX_FILE)
    quarantined, whole = _tree(tmp_path / "q"), _tree(tmp_path / "q-whole")
    assert quarantined.pop("quarantine.csv") and whole.pop("quarantine.csv") and quarantined == whole
