"""A worker whose steps keep failing (the state folder's disk full, its database read-only) waits longer between
tries, as the sender does, rather than logging a traceback five times a second until the disk is freed."""

from __future__ import annotations

import sqlite3
import threading
import time

import pydicom

from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from tests.serve.node.peers import cr_study

FIELDS = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "CR"}


def test_a_worker_whose_steps_keep_failing_backs_off_and_resumes_once_they_succeed(predictor, tmp_path, monkeypatch, caplog):
    """Before, it tried again at every poll (0.2 s): a full disk filled the log with tracebacks as fast."""
    (path,) = cr_study(tmp_path / "in", 1, seed=51)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0, poll_seconds=0.2)
    store.receive(path.read_bytes(), ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, FIELDS)
    tries = []
    scored = store.set_scored

    def full(sop_uid, scores):
        tries.append(time.monotonic())
        if len(tries) <= 2:
            raise sqlite3.OperationalError("database or disk is full")
        scored(sop_uid, scores)

    monkeypatch.setattr(store, "set_scored", full)
    stop = threading.Event()
    running = threading.Thread(target=worker.run, args=(stop,))
    try:
        with caplog.at_level("ERROR", logger="medtriage.serve.node.worker"):
            running.start()
            time.sleep(2.0)
            failed = [r for r in caplog.records if "worker step failed" in r.getMessage()]
            assert len(failed) == 2 and len(tries) == 2  # tried at once, 1 s later, then not before 2 s more
            deadline = time.monotonic() + 10
            while store.counts()["studies"] != {"scored": 1} and time.monotonic() < deadline:
                time.sleep(0.1)
        assert store.counts()["studies"] == {"scored": 1} and len(tries) == 3
        assert tries[1] - tries[0] >= 0.9 and tries[2] - tries[1] >= 1.9
    finally:
        stop.set()
        running.join(timeout=10)
        store.close()
