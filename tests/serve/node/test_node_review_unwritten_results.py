"""A study whose results the disk refused to take (full for a moment, another program filling it) is shown failed
with the reason, and closed again with backoff, while the node runs and after its restart: a full disk costs time,
not the study's SR. A study whose SR cannot be built stays failed until a new instance arrives, as before."""

from __future__ import annotations

import errno
import time

import pydicom
import pytest

from medtriage.serve.node import worker as worker_module
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from tests.serve.node.peers import cr_study


@pytest.fixture
def received_and_scored(node_worker, receive_file, tmp_path):
    """A new study of one instance (from `seed`) received into the node's store and scored; returns its Study UID."""

    def receive(seed: int) -> str:
        (path,) = cr_study(tmp_path / "in", 1, seed=seed)
        receive_file(path)
        time.sleep(0.01)
        assert node_worker.score_queued()
        return pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID

    return receive


def _restarted(tmp_path, node_worker: Worker) -> tuple[NodeStore, Worker]:
    """The node's state folder opened again, as a restarted node does, and a new worker over it."""
    store = NodeStore(tmp_path / "state", recover=True)
    return store, Worker(store, node_worker.predictor, node_worker.destinations, study_timeout=0)


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


def test_a_study_whose_results_the_full_disk_refused_is_closed_again_once_it_takes_them(
    node_store, node_worker, received_and_scored, monkeypatch
):
    """Before, it stayed failed for good: no SR unless the modality sent the study again."""
    study_uid = received_and_scored(61)
    _disk_full_for(monkeypatch, 2)
    node_worker.close_quiet_studies()
    study = _study(node_store, study_uid)
    assert study["state"] == "failed" and "No space left on device" in study["reason"] and "trying again" in study["reason"]
    node_worker.close_quiet_studies()  # not before its wait: no busy loop on a full disk
    assert _study(node_store, study_uid)["state"] == "failed"
    time.sleep(1.1)
    node_worker.close_quiet_studies()  # the disk still full: failed again, a longer wait
    assert _study(node_store, study_uid)["state"] == "failed" and _sr_count(node_store, study_uid) == 0
    time.sleep(1.1)
    node_worker.close_quiet_studies()
    assert _study(node_store, study_uid)["state"] == "failed"  # its wait is 2 s now
    time.sleep(1.0)
    assert node_worker.close_quiet_studies()
    assert _study(node_store, study_uid)["state"] == "scored" and _sr_count(node_store, study_uid) == 1


def test_a_study_whose_results_the_full_disk_refused_is_closed_again_after_a_restart(
    node_store, node_worker, received_and_scored, tmp_path, monkeypatch
):
    study_uid = received_and_scored(62)
    _disk_full_for(monkeypatch, 1)
    node_worker.close_quiet_studies()
    assert _study(node_store, study_uid)["state"] == "failed"
    node_store.close()
    store, worker = _restarted(tmp_path, node_worker)
    try:
        assert worker.close_quiet_studies()
        assert _study(store, study_uid)["state"] == "scored" and _sr_count(store, study_uid) == 1
    finally:
        store.close()


def test_a_study_whose_sr_cannot_be_built_stays_failed(node_store, node_worker, received_and_scored, tmp_path, monkeypatch):
    """Only what the disk refused is tried again: a damaged header fails the same way each time."""
    study_uid = received_and_scored(63)

    def broken(*args, **kwargs):
        raise ValueError("a damaged header")

    monkeypatch.setattr(worker_module, "build_study_sr", broken)
    node_worker.close_quiet_studies()
    time.sleep(1.1)
    assert not node_worker.close_quiet_studies()
    node_store.close()
    store, worker = _restarted(tmp_path, node_worker)
    try:
        assert not worker.close_quiet_studies()
        assert _study(store, study_uid)["state"] == "failed"
    finally:
        store.close()
