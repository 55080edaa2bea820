"""Group commit of the ingest index: pooled files are written whole (bytes on disk before the rename), and once per batch
the folders holding them and the quarantine list are synced before the batch's index rows are appended and the index
synced. A crash anywhere in a batch leaves no index row naming a file that is not on disk, and the next run takes the
batch's inputs up again, ending with the pool of an uninterrupted run: nothing lost, nothing twice."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import medtriage.io.ingest as ingest
import medtriage.io.ingest_ledger as ledger
from medtriage.io import safe_output
from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_ledger import INDEX_FILE, ledger_folder
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site
from tests.io.test_ingest_faults import SECRET, _rows, _tree

KEY = SiteKey(SECRET)
BATCH = 3  # the site has 5 files to pool and 5 to quarantine: batches of 3 rows commit more than once per run

# Ingest in a child, in batches of 3 rows, that SIGKILLs itself right after a pooled file's rename ("renamed": its folder
# not synced, no index row), or right after a commit synced the site's pool folder ("synced": its index row not yet
# written), once the given number of files is pooled.
KILLED_IN_A_BATCH = textwrap.dedent(f"""
    import os, signal, sys
    from pathlib import Path
    import medtriage.io.ingest as ingest
    import medtriage.io.ingest_ledger as ledger
    from medtriage.io.site_key import SiteKey

    src, pool, quarantine, at, after = sys.argv[1:6]
    ledger.BATCH_FILES = {BATCH}
    real_write, real_sync, pooled = ledger.write_pooled, ledger.sync_folder, []

    def write(path, data):
        pooled.append(real_write(path, data))
        if at == "renamed" and len(pooled) == int(after):
            os.kill(os.getpid(), signal.SIGKILL)
        return pooled[-1]

    def sync(folder):
        real_sync(folder)
        if at == "synced" and Path(folder) == Path(pool) / "site_a" and len(pooled) >= int(after):
            os.kill(os.getpid(), signal.SIGKILL)

    ledger.write_pooled, ledger.sync_folder = write, sync
    ingest.ingest_site("site_a", src, pool, key=SiteKey({SECRET!r}), quarantine=quarantine, progress=False)
""")


def _index_rows(pool: Path) -> list[dict]:
    with open(ledger_folder(pool, "site_a") / INDEX_FILE, newline="") as f:
        return list(csv.DictReader(f))


def _whole(tmp_path: Path) -> Path:
    """The site, built, and ingested by one uninterrupted run into `whole` (quarantine `q-whole`)."""
    build_phi_site(tmp_path / "site")
    ingest_site("site_a", tmp_path / "site", tmp_path / "whole", key=KEY, quarantine=tmp_path / "q-whole", progress=False)
    return tmp_path / "whole"


def _same_as_whole(tmp_path: Path, pool: Path, quarantine: Path) -> None:
    assert _tree(pool / "site_a") == _tree(tmp_path / "whole" / "site_a")  # no file lost, none twice, none left over
    index = ledger_folder(pool, "site_a") / INDEX_FILE
    assert _rows(index) == _rows(ledger_folder(tmp_path / "whole", "site_a") / INDEX_FILE)
    keys = [row["content_key"] for row in _index_rows(pool)]
    assert len(keys) == len(set(keys))  # one row per input
    assert _rows(quarantine / "quarantine.csv") == _rows(tmp_path / "q-whole" / "quarantine.csv")
    quarantined, whole = _tree(quarantine), _tree(tmp_path / "q-whole")
    assert quarantined.pop("quarantine.csv") and whole.pop("quarantine.csv") and quarantined == whole


@pytest.mark.parametrize("at, after", [("renamed", 4), ("renamed", 5), ("synced", 4)])
def test_a_batch_killed_before_its_index_rows_leaves_no_row_naming_a_missing_file_and_a_rerun_ends_as_a_whole_run(tmp_path, at, after):
    _whole(tmp_path)
    pool, quarantine = tmp_path / "pool", tmp_path / "q"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_A_BATCH, str(tmp_path / "site"), str(pool), str(quarantine), at, str(after)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    site_dir, rows = pool / "site_a", _index_rows(pool)
    indexed = {row["path"] for row in rows if row["outcome"] == "pooled"}
    assert indexed and all((site_dir / name).is_file() for name in indexed)  # a batch was committed, and names what is there
    in_place = {p.name for p in site_dir.glob("*.dcm")}
    assert in_place - indexed  # the killed batch's files: in place, whole, not yet named by the index

    summary = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    assert summary.pooled == 5 and summary.pooled_before == len(indexed)  # what the index named is not done again
    assert summary.counts_in == summary.pooled + sum(summary.quarantined.values())
    assert not list(site_dir.glob(".*"))
    _same_as_whole(tmp_path, pool, quarantine)


class _FsyncLog:
    """Stands in for `os` in the ledger: each fsync of the index or the quarantine list checks what is on disk then."""

    def __init__(self, on_fsync):
        self.on_fsync = on_fsync

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self.on_fsync(os.fstat(fd))


def test_an_index_row_is_written_only_once_its_file_and_folder_and_quarantine_listing_are_on_disk(tmp_path, monkeypatch):
    """The order a crash could cut at any point: at every fsync of the index, each pooled file it names was written
    whole (synced before its rename) and its folder synced after, and each quarantined input it marks done is in the
    quarantine list as synced before it. The rows come in batches: fewer syncs than files."""
    tmp_path = tmp_path.resolve()  # as the ledger names its paths
    _whole(tmp_path)
    pool, quarantine = tmp_path / "pool", tmp_path / "q"
    site_dir, index, listing = pool / "site_a", ledger_folder(pool, "site_a") / INDEX_FILE, quarantine / "quarantine.csv"
    written, durable, listed, index_syncs, folder_syncs = set(), set(), set(), [], []
    real_write, real_sync = ledger.write_pooled, ledger.sync_folder

    def write(path, data):
        written.add(real_write(path, data))
        return Path(path)

    def sync(folder):
        real_sync(folder)
        folder_syncs.append(Path(folder))
        durable.update(p for p in written if p.parent == Path(folder))

    def synced(status):
        if listing.exists() and status.st_ino == listing.stat().st_ino:
            with open(listing, newline="") as f:
                listed.update(row["content_key"] for row in csv.DictReader(f))
        elif status.st_ino == index.stat().st_ino:
            rows = _index_rows(pool)
            index_syncs.append(len(rows))
            assert {site_dir / r["path"] for r in rows if r["outcome"] == "pooled"} <= durable
            assert {r["content_key"] for r in rows if r["outcome"] == "quarantined"} <= listed

    monkeypatch.setattr(ledger, "BATCH_FILES", BATCH)
    monkeypatch.setattr(ledger, "write_pooled", write)
    monkeypatch.setattr(ledger, "sync_folder", sync)
    monkeypatch.setattr(ledger, "os", _FsyncLog(synced))
    summary = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)

    rows = len(_index_rows(pool))
    assert summary.pooled_new == 5 and index_syncs[-1] == rows
    assert 1 < len(index_syncs) < rows  # batches: more than one commit, fewer than one per row
    assert folder_syncs.count(site_dir) < summary.pooled_new  # the pool's folder synced per batch, not per file
    _same_as_whole(tmp_path, pool, quarantine)


def test_a_write_failing_mid_batch_commits_the_rows_before_it_and_none_for_it(tmp_path, monkeypatch):
    """A full disk on the third pooled file: the run fails, the index keeps the two files written before it (the batch
    is committed on the way out, each of its rows naming a file written whole) and nothing for the third, and the next
    run completes the site."""
    _whole(tmp_path)
    pool, quarantine, real_write, pooled = tmp_path / "pool", tmp_path / "q", ledger.write_pooled, []

    def full_disk(path, data):
        if len(pooled) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        pooled.append(real_write(path, data))
        return pooled[-1]

    monkeypatch.setattr(ledger, "write_pooled", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    assert {row["path"] for row in _index_rows(pool)} == {p.name for p in pooled}
    assert sorted(p.name for p in (pool / "site_a").glob("*.dcm")) == sorted(p.name for p in pooled)

    monkeypatch.undo()
    summary = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    assert (summary.pooled_before, summary.pooled_new) == (2, 3)
    _same_as_whole(tmp_path, pool, quarantine)


def test_a_stop_commits_the_batch_it_came_in(tmp_path, monkeypatch):
    """SIGTERM during the fourth input, none of whose batch was committed yet: that input is finished, and the four
    are in the index when the run ends; the next run takes up the rest."""
    _whole(tmp_path)
    pool, quarantine, judged = tmp_path / "pool", tmp_path / "q", ingest.process_file
    begun = []

    def stopped_meanwhile(source: str):
        out = judged(source)
        begun.append(source)
        if len(begun) == 4:  # while the fourth file is in progress
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(ingest, "process_file", stopped_meanwhile)
    with pytest.raises(ingest.IngestStopped, match="stopped by SIGTERM after 4 of 10 files"):
        ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    rows = _index_rows(pool)
    assert len(rows) == 4 and all((pool / "site_a" / row["path"]).is_file() for row in rows)

    monkeypatch.undo()
    summary = ingest_site("site_a", tmp_path / "site", pool, key=KEY, quarantine=quarantine, progress=False)
    assert (summary.pooled_before, summary.pooled_new) == (4, 1)
    _same_as_whole(tmp_path, pool, quarantine)


def test_a_file_written_for_group_commit_is_synced_before_its_rename_and_never_seen_half(tmp_path, monkeypatch):
    calls = []

    class Logged:
        def __getattr__(self, name):
            return getattr(os, name)

        def fsync(self, fd):
            calls.append("fsync")
            os.fsync(fd)

        def replace(self, source, target):
            calls.append("replace")
            os.replace(source, target)

    target = tmp_path / "a.dcm"
    target.write_bytes(b"old")
    monkeypatch.setattr(safe_output, "os", Logged())
    assert safe_output.write_atomic_unsynced_folder(target, b"new bytes") == target
    assert calls == ["fsync", "replace"] and target.read_bytes() == b"new bytes"  # no folder sync: the caller's

    def failing(source, target):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(Logged, "replace", lambda self, source, target: failing(source, target))
    with pytest.raises(OSError):
        safe_output.write_atomic_unsynced_folder(target, b"newer")
    assert target.read_bytes() == b"new bytes" and [p.name for p in tmp_path.iterdir()] == ["a.dcm"]
    assert oct(target.stat().st_mode & 0o777) == oct(safe_output.PUBLIC_MODE)
