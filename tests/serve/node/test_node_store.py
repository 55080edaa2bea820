"""The node's durable queue on its own (no network), what its start clears, and its torch-free import."""

from __future__ import annotations

import errno
import json
import sqlite3
import time
from io import BytesIO

import pydicom
import pytest

from medtriage.errors import ConfigError
from medtriage.serve.node.sender import Peer, backoff
from medtriage.serve.node.store import DB_FILE, OUTBOX_DIR, SPOOL_DIR, CommitUncertain, ConflictingPatient, NodeStore, digest_name
from medtriage.serve.node.worker import Worker
from tests.serve.node.peers import cr_study

FIELDS = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "CR"}


def receive(store: NodeStore, path, sop: str, study: str) -> bool:
    return store.receive(path.read_bytes(), sop, study, "1.2.3", "1.2.840.10008.5.1.4.1.1.1", FIELDS)


def test_an_instance_is_spooled_under_a_digest_name_and_kept_once(tmp_path):
    (path,) = cr_study(tmp_path / "in", 1, seed=1)
    store = NodeStore(tmp_path / "state")
    hostile = "../../etc/passwd"  # a header value never becomes a path
    assert receive(store, path, hostile, "9.9") and not receive(store, path, hostile, "9.9")
    (spooled,) = (tmp_path / "state" / "spool").iterdir()
    assert spooled.read_bytes() == path.read_bytes() and ".." not in spooled.name and len(spooled.name) == 44
    assert [i.sop_uid for i in store.unscored()] == [hostile]
    store.close()
    reopened = NodeStore(tmp_path / "state")  # a restart finds the queued instance again
    assert [i.spool for i in reopened.unscored()] == [spooled]


def test_a_study_is_not_closed_when_an_instance_arrived_meanwhile(tmp_path):
    first, second = cr_study(tmp_path / "in", 2, seed=2)
    store = NodeStore(tmp_path / "state")
    receive(store, first, "1.1", "5.5")
    store.set_rejected("1.1", "truncated pixel data")
    seen = time.time() - 5  # the worker looked before the next instance came
    assert not store.close_study("5.5", None, "truncated", None, [], seen)
    assert store.close_study("5.5", None, "truncated", None, [], time.time())
    assert store.counts()["studies"] == {"not_analysed": 1}
    receive(store, second, "1.2", "5.5")  # a late instance reopens the study
    assert store.counts()["studies"] == {"receiving": 1}


def test_a_study_first_received_without_a_patient_id_takes_the_first_one_named_and_keeps_to_it(tmp_path):
    store = NodeStore(None)

    def record(sop: str, patient: str) -> bool:
        return store.receive(b"", sop, "5.5", "1.2.3", "1.2", {**FIELDS, "patient_id": patient})

    assert record("1.1", "") and record("1.2", "P1") and record("1.3", "")  # a blank Patient ID is unknown
    with pytest.raises(ConflictingPatient):
        record("1.4", "P2")
    (study,) = store.shown_studies(1)
    assert json.loads(study["fields"])["patient_id"] == "P1"  # what the worklist row shows
    assert [row["sop_uid"] for row in store.study_instances("5.5")] == ["1.1", "1.2", "1.3"]


def test_destinations_and_backoff():
    assert str(Peer.parse("ORTHANC@pacs.example.org:4242")) == "ORTHANC@pacs.example.org:4242"
    for bad in ("ORTHANC@pacs", "pacs:4242", "A@h:99999", "TOO-LONG-AE-TITLE-X@h:1", "ORT\x07HANC@h:1", "   @h:1", "A\\B@h:1"):
        with pytest.raises(ConfigError):
            Peer.parse(bad)
    assert [backoff(n, 60) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_the_node_imports_without_torch(run_without_training_stack):
    out = run_without_training_stack("""
        import sys
        import medtriage.serve.node.cli, medtriage.serve.node.node, medtriage.serve.node.heatmap, medtriage.serve.worklist
        print(sorted(m for m in sys.modules if m.split(".")[0] in Blocker.blocked))
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_only_the_node_itself_clears_half_written_spool_files_and_half_received_instances(tmp_path):
    NodeStore(tmp_path / "state").close()
    leftovers = [tmp_path / "state" / "spool" / ".abc.dcm.x.partial", tmp_path / "state" / "incoming" / "tmpk2j4.dcm"]
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    NodeStore(tmp_path / "state").close()  # a reader (the worklist) leaves them: a running node may be writing them
    assert all(leftover.exists() for leftover in leftovers)
    NodeStore(tmp_path / "state", recover=True).close()  # the node at start: a killed process left them
    assert not any(leftover.exists() for leftover in leftovers)


def test_a_second_node_on_a_state_folder_in_use_is_refused_and_leaves_the_first_ones_files(tmp_path):
    running = NodeStore(tmp_path / "state", recover=True)
    arriving = tmp_path / "state" / "incoming" / "tmpk2j4.dcm"  # an instance the running node is receiving
    arriving.write_bytes(b"half")
    with pytest.raises(ConfigError, match="--state") as refused:
        NodeStore(tmp_path / "state", recover=True)
    assert refused.value.hint and arriving.exists()
    NodeStore(tmp_path / "state").close()  # a reader (the worklist) still opens it
    running.close()
    NodeStore(tmp_path / "state", recover=True).close()  # the folder is free once its node stopped


class Killed(BaseException):
    """The node killed where it is (kill -9): nothing after this point runs."""


def _received(store: NodeStore, path) -> str:
    """Receive the instance at `path` as the SCP does; its study's UID."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store.receive(path.read_bytes(), ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, FIELDS)
    return ds.StudyInstanceUID


def _scored(worker: Worker, store: NodeStore, path) -> str:
    """Receive and score the instance at `path`, its study quiet since; its study's UID."""
    study = _received(store, path)
    time.sleep(0.01)
    assert worker.score_queued()
    return study


def _closed(worker: Worker, store: NodeStore, path) -> str:
    """Receive and score the one-instance study at `path`, and close it: its results in the outbox, its deliveries due."""
    study = _scored(worker, store, path)
    worker.close_quiet_studies()
    return study


def _recorded(store: NodeStore) -> set[str]:
    return {row["file"] for row in store._execute("SELECT file FROM deliveries")}


def test_results_a_killed_node_wrote_but_never_recorded_are_removed_when_the_node_starts_again(predictor, tmp_path, caplog, monkeypatch):
    """Before, they stayed in the outbox for good: the study is closed again after the restart, with results of its own."""
    delivered, pending, interrupted = (cr_study(tmp_path / "in", 1, seed=seed)[0] for seed in (11, 12, 13))
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0, heatmaps=True)
    _closed(worker, store, delivered)
    store.set_delivered(store.due_deliveries()[0].id)
    _closed(worker, store, pending)

    def killed(*args, **kwargs):  # between the results written and their deliveries' commit
        raise Killed

    monkeypatch.setattr(store, "close_study", killed)
    with pytest.raises(Killed):
        _closed(worker, store, interrupted)
    store.close()
    outbox = tmp_path / "state" / OUTBOX_DIR
    kept = {path.name for path in outbox.iterdir()}
    reader = NodeStore(tmp_path / "state")  # the worklist: a running node may be writing them
    assert {path.name for path in outbox.iterdir()} == kept and len(kept - _recorded(reader)) == 2  # the SR and heatmap
    reader.close()
    with caplog.at_level("INFO", logger="medtriage.serve.node.store"):
        store = NodeStore(tmp_path / "state", recover=True)
    recorded = _recorded(store)
    assert {path.name for path in outbox.iterdir()} == recorded and len(recorded) == 4  # delivered and pending results stay
    (said,) = [r.getMessage() for r in caplog.records if "no delivery names" in r.getMessage()]
    assert said.startswith("removed 2 result file(s)")
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0, heatmaps=True)
    assert worker.close_quiet_studies()  # the interrupted study is closed again, with results of its own
    assert {path.name for path in outbox.iterdir()} == _recorded(store) and len(_recorded(store)) == 6
    store.close()


@pytest.mark.parametrize("failure", ["refused", "raises"])
def test_results_of_a_close_that_did_not_commit_are_removed_at_once(predictor, tmp_path, monkeypatch, failure):
    """Before, they stayed in the outbox until the node started again. A late instance reopens a reported study, and
    its close is refused (another instance arrived meanwhile) or raises (the database held by another process): the
    files it wrote go, those of the committed first report stay, and the close that commits writes its own."""
    first, late, later = cr_study(tmp_path / "in", 3, seed=14)
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0, heatmaps=True)
    outbox = tmp_path / "state" / OUTBOX_DIR
    try:
        _closed(worker, store, first)
        reported = _recorded(store)
        assert len(reported) == 2 and {path.name for path in outbox.iterdir()} == reported  # the SR and heatmap
        _scored(worker, store, late)
        if failure == "refused":
            close = store.close_study

            def arriving(*args, **kwargs):  # after the worker looked, before its commit
                _received(store, later)
                return close(*args, **kwargs)

            monkeypatch.setattr(store, "close_study", arriving)
            assert worker.close_quiet_studies()
            monkeypatch.undo()
        else:
            _held_while_closing(worker, store)
        assert _recorded(store) == reported and {path.name for path in outbox.iterdir()} == reported
        time.sleep(0.01)
        worker.score_queued()
        assert worker.close_quiet_studies()  # the close that commits, with results of its own
        assert len(_recorded(store)) == 4 and {path.name for path in outbox.iterdir()} == _recorded(store)
    finally:
        store.close()


def _held_while_closing(worker: Worker, store: NodeStore) -> None:
    """Close the quiet studies while another process holds the database: the close raises."""
    holder = sqlite3.connect(store.folder / DB_FILE, isolation_level=None)
    store._db.execute("PRAGMA busy_timeout = 100")  # not the 30 s a node waits for its database
    holder.execute("BEGIN IMMEDIATE")  # a writer of another process (a worklist, a backup tool)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            worker.close_quiet_studies()
    finally:
        holder.execute("COMMIT")
        holder.close()


def _failing_heatmap(monkeypatch, failure: str) -> str:
    """Make the heatmap's build raise an unexpected error, or the write of its file find the disk full: what the
    study's reason then says."""
    from medtriage.serve.node import heatmap, worker

    if failure == "build":

        def broken(*args, **kwargs):
            raise RuntimeError("no picture today")

        monkeypatch.setattr(heatmap, "secondary_capture", broken)
        return "RuntimeError: no picture today"
    write_atomic = worker.write_atomic

    def full_after_the_sr(path, data, *args, **kwargs):
        if pydicom.dcmread(BytesIO(data), stop_before_pixels=True).Modality != "SR":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_atomic(path, data, *args, **kwargs)

    monkeypatch.setattr(worker, "write_atomic", full_after_the_sr)
    return "No space left on device"


@pytest.mark.parametrize("failure", ["build", "write"])
def test_files_of_a_close_whose_heatmap_fails_unexpectedly_are_removed_and_the_study_failed(
    predictor, tmp_path, monkeypatch, caplog, failure
):
    """Before, the SR written ahead of the heatmap stayed in the outbox, named by no delivery, until the node started
    again. The study fails as one whose SR cannot be built does, the error logged with its traceback."""
    reason = _failing_heatmap(monkeypatch, failure)
    (path,) = cr_study(tmp_path / "in", 1, seed=15)
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0, heatmaps=True)
    try:
        with caplog.at_level("WARNING", logger="medtriage.serve.node.worker"):
            study = _closed(worker, store, path)
        assert not list((tmp_path / "state" / OUTBOX_DIR).iterdir()) and not _recorded(store)
        (row,) = store._execute("SELECT state, reason, sr_uid FROM studies WHERE study_uid = ?", (study,))
    finally:
        store.close()
    assert (row["state"], row["sr_uid"]) == ("failed", None) and reason in row["reason"]
    (said,) = [r for r in caplog.records if "no SR could be built" in r.getMessage()]
    assert said.exc_info is not None and reason in said.getMessage()


class _SyncFailsAtCommit:
    """The node's connection, whose COMMIT writes its commit record and then reports the disk's refusal to sync it, as
    SQLite does (SQLITE_IOERR_FSYNC): a crash now may keep the transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args):
        done = self._db.execute(sql, *args)
        if sql == "COMMIT":
            refused = sqlite3.OperationalError("disk I/O error")
            refused.sqlite_errorcode = 1034  # SQLITE_IOERR_FSYNC
            raise refused
        return done

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def test_results_of_a_close_whose_commit_may_have_landed_stay_until_the_next_start(predictor, tmp_path, monkeypatch):
    """Before, they were removed at once, as a close refused before its commit: the database, which kept the commit,
    then named files that were gone, and the study's report was never sent."""
    (path,) = cr_study(tmp_path / "in", 1, seed=16)
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0, heatmaps=True)
    outbox = tmp_path / "state" / OUTBOX_DIR
    _scored(worker, store, path)
    monkeypatch.setattr(store, "_db", _SyncFailsAtCommit(store._db))
    with pytest.raises(CommitUncertain):
        worker.close_quiet_studies()
    monkeypatch.undo()
    store.close()
    store = NodeStore(tmp_path / "state", recover=True)  # the next start: here the commit landed, and its files stay
    try:
        recorded = _recorded(store)
        assert len(recorded) == 2 and {p.name for p in outbox.iterdir()} == recorded  # the SR and heatmap, both sendable
    finally:
        store.close()


def test_an_instance_whose_commit_may_have_landed_keeps_its_spool_file_and_a_resend_is_taken(tmp_path, monkeypatch):
    """Before, its spool file was removed as one refused before its commit: the database, which kept the commit, named
    a file that was gone, and the sender's resend was answered success for an instance the node no longer had."""
    (path,) = cr_study(tmp_path / "in", 1, seed=17)
    store = NodeStore(tmp_path / "state", recover=True)
    try:
        monkeypatch.setattr(store, "_db", _SyncFailsAtCommit(store._db))
        with pytest.raises(OSError, match="may or may not hold") as refused:  # answered 0xA700: the sender resends
            _received(store, path)
        assert refused.value.errno == errno.EIO
        monkeypatch.undo()
        _received(store, path)  # the resend: already held, answered success
        (queued,) = store.unscored()
        assert queued.spool.read_bytes() == path.read_bytes()
    finally:
        store.close()


def test_an_instance_file_a_killed_node_put_in_the_spool_but_never_recorded_is_removed_when_it_starts_again(tmp_path, caplog):
    """Before, it stayed in the spool for good (up to an instance's size per kill): its sender got no success, and one
    that never sends it again leaves it named by no row. Recorded instances stay."""
    kept, interrupted = cr_study(tmp_path / "in", 2, seed=18)
    spool = tmp_path / "state" / SPOOL_DIR
    store = NodeStore(tmp_path / "state", recover=True)
    _received(store, kept)
    store.close()
    orphan = spool / digest_name(pydicom.dcmread(interrupted, stop_before_pixels=True).SOPInstanceUID)
    orphan.write_bytes(interrupted.read_bytes())  # renamed into place; the node killed before its row's commit
    NodeStore(tmp_path / "state").close()  # a reader (the worklist) leaves it: a running node may be recording it
    assert orphan.exists()
    with caplog.at_level("INFO", logger="medtriage.serve.node.store"):
        store = NodeStore(tmp_path / "state", recover=True)
    try:
        (queued,) = store.unscored()
        assert [path.name for path in spool.iterdir()] == [queued.spool.name] and queued.spool.read_bytes() == kept.read_bytes()
    finally:
        store.close()
    assert any(r.getMessage().startswith("removed 1 instance file(s)") for r in caplog.records)


class _DiskRefusesWrites:
    """The node's connection once the state folder's disk is remounted read-only: each write is refused, as SQLite
    refuses it (SQLITE_READONLY_DBMOVED and its kin, or SQLITE_IOERR_WRITE)."""

    def __init__(self, db: sqlite3.Connection, code: int) -> None:
        self._db, self._code = db, code

    def execute(self, sql: str, *args):
        if sql.startswith("INSERT"):
            refused = sqlite3.OperationalError("attempt to write a readonly database")
            refused.sqlite_errorcode = self._code
            raise refused
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


@pytest.mark.parametrize("code", [1032, 778])  # SQLITE_READONLY_DBMOVED, SQLITE_IOERR_WRITE
def test_an_instance_arriving_while_the_database_cannot_be_written_is_refused_for_now_and_leaves_no_file(tmp_path, monkeypatch, code):
    """Before, the error went up unchanged and the instance was answered 0x0110 (processing failure), which a sender
    may take as final; as a full database, it is now an OSError, answered 0xA700 (out of resources): sent again."""
    (path,) = cr_study(tmp_path / "in", 1, seed=19)
    store = NodeStore(tmp_path / "state", recover=True)
    try:
        monkeypatch.setattr(store, "_db", _DiskRefusesWrites(store._db, code))
        with pytest.raises(OSError, match="cannot be written") as refused:
            _received(store, path)
        assert refused.value.errno == errno.EIO and refused.value.strerror.endswith("check the state folder's disk")
        monkeypatch.undo()
        assert not store.unscored() and not list((tmp_path / "state" / SPOOL_DIR).iterdir())
    finally:
        store.close()
