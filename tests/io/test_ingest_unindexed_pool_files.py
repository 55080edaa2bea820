"""A pooled file no index row names: a run killed after the file's rename, before its batch's commit, leaves one. Where
its input is still in the site folder the next run makes it again and names it; where the input has gone meanwhile
(deleted or moved at the site), nothing would, and pool readers, which read the folder, would take up a file whose
ingest was never recorded. A run that ends sets each such file aside into the quarantine, listed with its reason."""

from __future__ import annotations

import csv
import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medtriage.io import safe_output
from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_ledger import INDEX_FILE, ledger_folder
from tests.io.test_ingest_durable_batches import KEY, KILLED_IN_A_BATCH, _index_rows, _whole
from tests.io.test_ingest_faults import _rows

REASON = "unindexed_pool_file"


def _killed_in_a_batch(tmp_path: Path, pool: Path, quarantine: Path) -> set[str]:
    """An ingest of the site killed right after its 4th pooled file's rename; the names of the pooled files it left
    that no index row names."""
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_A_BATCH, str(tmp_path / "site"), str(pool), str(quarantine), "renamed", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    indexed = {row["path"] for row in _index_rows(pool) if row["outcome"] == "pooled"}
    unindexed = {path.name for path in (pool / "site_a").glob("*.dcm")} - indexed
    assert unindexed
    return unindexed


def _sources_of(tmp_path: Path, names: set[str]) -> list[Path]:
    """The inputs the uninterrupted run pooled as `names`, found by their content keys in its index."""
    paths = {row["content_key"]: row["path"] for row in _index_rows(tmp_path / "whole")}
    sources = [p for p in (tmp_path / "site").rglob("*") if p.is_file() and paths.get(KEY.content_key(p.read_bytes())) in names]
    assert len(sources) == len(names)
    return sources


def _listed(quarantine: Path) -> list[dict]:
    with open(quarantine / "quarantine.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_pooled_file_whose_input_went_before_the_rerun_is_set_aside_not_left_unindexed(tmp_path):
    _whole(tmp_path)
    (tmp_path / "site" / "zz_more" / "zz_duplicate.dcm").unlink()  # its SOP instance's file would be pooled in its stead
    pool, quarantine = tmp_path / "pool", tmp_path / "q"
    orphans = _killed_in_a_batch(tmp_path, pool, quarantine)
    kept = {name: (pool / "site_a" / name).read_bytes() for name in orphans}
    for source in _sources_of(tmp_path, orphans):  # deleted at the site before the rerun
        source.unlink()

    summary = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)

    site_dir, rows = pool / "site_a", _index_rows(pool)
    indexed = {row["path"] for row in rows if row["outcome"] == "pooled"}
    assert {path.name for path in site_dir.glob("*.dcm")} == indexed  # every pooled file named, no other left
    assert not orphans & indexed and summary.pooled == 5 - len(orphans)
    assert summary.counts_in == summary.pooled + sum(summary.quarantined.values())  # inputs only: no orphan counted
    set_aside = sorted((quarantine / REASON).iterdir())
    assert sorted(path.read_bytes() for path in set_aside) == sorted(kept.values())  # kept whole, site side
    listed = [row for row in _listed(quarantine) if row["reason"] == REASON]
    assert sorted(Path(row["source"]).name for row in listed) == sorted(orphans)
    assert all("no index row" in row["detail"] for row in listed)
    log = json.loads(Path(summary.log_path).read_text())
    assert log["counts"]["unindexed_pool_files_set_aside"] == len(orphans)
    assert f"set aside {len(orphans)} pooled file(s)" in summary.line()

    before = _listed(quarantine)
    again = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    assert again.unindexed_set_aside == 0 and _listed(quarantine) == before  # nothing more


def test_a_run_failing_between_listing_and_removing_leaves_it_to_the_next_which_lists_it_once(tmp_path, monkeypatch):
    _whole(tmp_path)
    (tmp_path / "site" / "zz_more" / "zz_duplicate.dcm").unlink()
    pool, quarantine = tmp_path / "pool", tmp_path / "q"
    orphans = _killed_in_a_batch(tmp_path, pool, quarantine)
    for source in _sources_of(tmp_path, orphans):
        source.unlink()
    real_unlink = Path.unlink

    def failing(path, *args, **kwargs):
        if path.name in orphans:
            raise OSError(errno.EIO, "I/O error")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", failing)
    with pytest.raises(OSError, match="I/O error"):
        ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    assert all((pool / "site_a" / name).exists() for name in orphans)
    monkeypatch.undo()

    summary = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    assert summary.unindexed_set_aside == len(orphans)
    assert not any((pool / "site_a" / name).exists() for name in orphans)
    listed = [row for row in _listed(quarantine) if row["reason"] == REASON]
    assert sorted(Path(row["source"]).name for row in listed) == sorted(orphans)  # once each
    assert len(list((quarantine / REASON).iterdir())) == len(orphans)


def test_a_pooled_file_whose_input_is_still_there_is_made_again_not_set_aside(tmp_path):
    _whole(tmp_path)
    pool, quarantine = tmp_path / "pool", tmp_path / "q"
    _killed_in_a_batch(tmp_path, pool, quarantine)
    summary = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    assert summary.unindexed_set_aside == 0 and not (quarantine / REASON).exists()
    index = ledger_folder(pool, "site_a") / INDEX_FILE
    assert _rows(index) == _rows(ledger_folder(tmp_path / "whole", "site_a") / INDEX_FILE)


def test_without_a_site_lock_no_file_is_set_aside(tmp_path, monkeypatch):
    """Where the file system has no locks, another ingest of the site may be running: a file it has just pooled is not
    named by the index until its batch commits, so nothing is set aside."""
    _whole(tmp_path)
    pool = tmp_path / "whole"
    stray = pool / "site_a" / "OT.1.2.3.dcm"
    stray.write_bytes(b"not named by the index")
    monkeypatch.setattr(safe_output, "fcntl", None)
    summary = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=tmp_path / "q-whole", progress=False)
    assert summary.unindexed_set_aside == 0 and stray.exists()
