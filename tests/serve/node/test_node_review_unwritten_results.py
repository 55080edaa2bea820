"""A study whose results the disk refused to take (full for a moment, another program filling it) is shown failed
with the reason, and closed again with backoff, while the node runs and after its restart: a full disk costs time,
not the study's SR. A study whose SR cannot be built stays failed until a new instance arrives, as before."""

from __future__ import annotations

import errno
import time

import pydicom

from medtriage.serve.node import worker as worker_module
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from tests.serve.node.peers import cr_study

FIELDS = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "CR"}
DESTINATION = "PACS@127.0.0.1:1"


def _received_and_scored(store: NodeStore, worker: Worker, path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store.receive(path.read_bytes(), ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, FIELDS)
    time.sleep(0.01)
    assert worker.score_queued()
    return ds.StudyInstanceUID


def _study(store: NodeStore, study_uid: str):
    return store._execute("SELECT state, reason FROM studies WHERE study_uid = ?", (study_uid,))[0]


def _disk_full_for(monkeypatch, writes: int) -> None:
    """The outbox's disk refuses the next `writes` files."""
    write_atomic, refused = worker_module.write_atomic, []

    def full(path, data, *args, **kwargs):
        if len(refused) < writes:
            refused.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_atomic(path, data, *args, **kwargs)

    monkeypatch.setattr(worker_module, "write_atomic", full)


def _sr_count(store: NodeStore, study_uid: str) -> int:
    return len(store._execute("SELECT 1 FROM deliveries WHERE study_uid = ? AND kind = 'sr'", (study_uid,)))


def test_a_study_whose_results_the_full_disk_refused_is_closed_again_once_it_takes_them(predictor, tmp_path, monkeypatch):
    """Before, it stayed failed for good: no SR unless the modality sent the study again."""
    (path,) = cr_study(tmp_path / "in", 1, seed=61)
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, [DESTINATION], study_timeout=0)
    try:
        study_uid = _received_and_scored(store, worker, path)
        _disk_full_for(monkeypatch, 2)
        worker.close_quiet_studies()
        study = _study(store, study_uid)
        assert study["state"] == "failed" and "No space left on device" in study["reason"] and "trying again" in study["reason"]
        worker.close_quiet_studies()  # not before its wait: no busy loop on a full disk
        assert _study(store, study_uid)["state"] == "failed"
        time.sleep(1.1)
        worker.close_quiet_studies()  # the disk still full: failed again, a longer wait
        assert _study(store, study_uid)["state"] == "failed" and _sr_count(store, study_uid) == 0
        time.sleep(1.1)
        worker.close_quiet_studies()
        assert _study(store, study_uid)["state"] == "failed"  # its wait is 2 s now
        time.sleep(1.0)
        assert worker.close_quiet_studies()
        assert _study(store, study_uid)["state"] == "scored" and _sr_count(store, study_uid) == 1
    finally:
        store.close()


def test_a_study_whose_results_the_full_disk_refused_is_closed_again_after_a_restart(predictor, tmp_path, monkeypatch):
    (path,) = cr_study(tmp_path / "in", 1, seed=62)
    store = NodeStore(tmp_path / "state", recover=True)
    study_uid = _received_and_scored(store, Worker(store, predictor, [DESTINATION], study_timeout=0), path)
    _disk_full_for(monkeypatch, 1)
    Worker(store, predictor, [DESTINATION], study_timeout=0).close_quiet_studies()
    assert _study(store, study_uid)["state"] == "failed"
    store.close()
    store = NodeStore(tmp_path / "state", recover=True)
    try:
        assert Worker(store, predictor, [DESTINATION], study_timeout=0).close_quiet_studies()
        assert _study(store, study_uid)["state"] == "scored" and _sr_count(store, study_uid) == 1
    finally:
        store.close()


def test_a_study_whose_sr_cannot_be_built_stays_failed(predictor, tmp_path, monkeypatch):
    """Only what the disk refused is tried again: a damaged header fails the same way each time."""
    (path,) = cr_study(tmp_path / "in", 1, seed=63)
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, [DESTINATION], study_timeout=0)
    try:
        study_uid = _received_and_scored(store, worker, path)

        def broken(*args, **kwargs):
            raise ValueError("a damaged header")

        monkeypatch.setattr(worker_module, "build_study_sr", broken)
        worker.close_quiet_studies()
        time.sleep(1.1)
        assert not worker.close_quiet_studies()
        store.close()
        store = NodeStore(tmp_path / "state", recover=True)
        assert not Worker(store, predictor, [DESTINATION], study_timeout=0).close_quiet_studies()
        assert _study(store, study_uid)["state"] == "failed"
    finally:
        store.close()
