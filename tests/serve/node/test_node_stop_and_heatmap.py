"""A stop with batched scoring in progress keeps to the node's one bounded wait, and the instances being scored are
scored at the next start; the heatmap names the patient its study's SR names; the worker's record of the drift marks it
wrote stays bounded however many calling AE titles come."""

from __future__ import annotations

import signal
import threading
import time

import pydicom

from medtriage.serve import drift
from medtriage.serve.node import node as node_module
from medtriage.serve.node.header import read_identity
from medtriage.serve.node.node import Node, NodeConfig
from medtriage.serve.node.sender import Peer
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker, urgency
from tests.serve.node.peers import NODE_AET, Listener, cr_study, free_port, send_files, wait_for
from tests.serve.test_worklist_rows import flag_drift

DESTINATION = "PACS@127.0.0.1:1"
STOP_JOIN_S = 1.0  # the stop's wait in these tests, so that a stop past it shows in seconds


class HeldSession:
    """An ORT session whose calls wait until released: a batched scoring slower than any stop."""

    def __init__(self, session):
        self.session, self.entered, self.released = session, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, *args, **kwargs):
        self.entered.set()
        self.released.wait(timeout=120)
        return self.session.run(*args, **kwargs)


def receive(store: NodeStore, path) -> str:
    header = read_identity(path)
    store.receive(path.read_bytes(), header.sop_uid, header.study_uid, header.series_uid, header.sop_class, header.fields)
    return header.study_uid


def assert_resumed(state, predictor, instances: int) -> None:
    """What the stop left unscored is queued, its study not failed, and a new start scores it."""
    store = NodeStore(state, recover=True)
    try:
        counts = store.counts()
        assert counts["instances"] == {"received": instances} and "failed" not in counts["studies"]
        assert Worker(store, predictor, [DESTINATION], study_timeout=0).score_queued()
        assert store.counts()["instances"] == {"scored": instances}
    finally:
        store.close()


def test_a_stop_with_batched_scoring_in_progress_ends_within_its_wait(package_dir, predictor, tmp_path, monkeypatch):
    """Before, the stop waited for the scorings side by side without limit (the scoring threads' pool shut down waiting)."""
    state = tmp_path / "state"
    config = NodeConfig(package=package_dir, state=state, host="127.0.0.1", port=free_port(), send_to=Peer.parse(DESTINATION))
    config.max_batch = 2
    node = Node(config)
    held = node.batcher.session = HeldSession(node.batcher.session)
    monkeypatch.setattr(node_module, "STOP_JOIN_S", STOP_JOIN_S)
    for path in cr_study(tmp_path / "in", 2, seed=71):
        receive(node.store, path)
    node.start()
    try:
        assert held.entered.wait(timeout=30)
        stopping = threading.Thread(target=node.stop, kwargs={"drain_s": 0}, daemon=True)
        started = time.monotonic()
        stopping.start()
        stopping.join(timeout=STOP_JOIN_S + 5)
        assert not stopping.is_alive() and time.monotonic() - started < STOP_JOIN_S + 2
    finally:
        held.released.set()
    assert_resumed(state, predictor, 2)


# `medtriage listen` whose batched ORT calls never end, and whose stop waits STOP_JOIN_S.
HOLDING_MAIN = f"""
import sys, threading
from medtriage.cli import main
from medtriage.serve.node import node

batching = node.enable_batching

class Held:
    def __init__(self, session):
        self.session = session
    def __getattr__(self, name):
        return getattr(self.session, name)
    def run(self, *args, **kwargs):
        print("scoring held", flush=True)
        threading.Event().wait(120)
        return self.session.run(*args, **kwargs)

def holding(predictor, max_batch, wait_ms):
    batcher = batching(predictor, max_batch, wait_ms)
    batcher.session = Held(batcher.session)
    return batcher

node.enable_batching, node.STOP_JOIN_S = holding, {STOP_JOIN_S}
sys.exit(main(sys.argv[1:]))
"""


def test_a_node_process_stopped_with_batched_scoring_in_progress_exits_within_its_wait(package_dir, predictor, tmp_path):
    """SIGTERM as systemd sends it: the process ends after the stop's wait, not when the scoring ends."""
    state = tmp_path / "state"
    listener = Listener(package_dir, state, free_port(), "--send-to", DESTINATION, "--max-batch", "2")
    listener.command[2] = HOLDING_MAIN
    listener.start()
    try:
        files = cr_study(tmp_path / "in", 2, seed=72)
        assert set(send_files(listener.port, files, aet=NODE_AET).values()) == {0x0000}
        wait_for(lambda: "scoring held" in listener.log.read_text(), 30, "the scoring to start")
        listener.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert listener.process.wait(timeout=STOP_JOIN_S + 15) == 0, listener.log.read_text()[-3000:]
        assert time.monotonic() - started < STOP_JOIN_S + 10
    finally:
        if listener.process.poll() is None:
            listener.kill()
    assert "still busy" in listener.log.read_text()
    assert_resumed(state, predictor, 2)


def test_a_scoring_that_raises_side_by_side_leaves_its_instance_queued_and_records_those_before(predictor, tmp_path, monkeypatch):
    """As a step that fails alone: the worker's loop logs it and tries again; what was scored before it is kept."""
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, [DESTINATION], study_timeout=60, at_once=2)
    first, failing = cr_study(tmp_path / "in", 2, seed=74)
    for path in (first, failing):
        receive(store, path)
    score, fails = predictor.score_or_reject, read_identity(failing).sop_uid

    def raising(path, name):
        if read_identity(path).sop_uid == fails:
            raise RuntimeError("a scoring fault")
        return score(path, name)

    monkeypatch.setattr(predictor, "score_or_reject", raising)
    try:
        try:
            worker.score_queued()
        except RuntimeError as err:
            assert str(err) == "a scoring fault"
        else:
            raise AssertionError("the scoring's fault was not raised")
        assert store.counts()["instances"] == {"scored": 1, "received": 1}
        assert worker.close(timeout=1)
    finally:
        store.close()


def _blank_patient(path) -> None:
    ds = pydicom.dcmread(path)
    ds.PatientID, ds.PatientName = "", ""
    ds.save_as(path)


def _results(store: NodeStore) -> dict[str, pydicom.Dataset]:
    rows = store._execute("SELECT DISTINCT kind, file FROM deliveries")
    return {row["kind"]: pydicom.dcmread(store.outbox_path(row["file"])) for row in rows}


def test_the_heatmap_names_the_patient_its_study_s_sr_names(predictor, tmp_path):
    """The study's most urgent image, received first, names no patient; the other names the study's. Before, the SR
    named the study's patient and the heatmap, drawn from the first, named none: a PACS filed them apart."""
    files = cr_study(tmp_path / "in", 2, seed=73, patient="PSEUDO-73")
    top = min(files, key=lambda path: urgency(predictor.score_or_reject(path, path.name)[0].as_dict()))
    _blank_patient(top)
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, [DESTINATION], study_timeout=0, heatmaps=True)
    try:
        for path in sorted(files, key=lambda path: path != top):
            receive(store, path)
            time.sleep(0.01)
        assert worker.score_queued()
        time.sleep(0.01)
        assert worker.close_quiet_studies()
        results = _results(store)
    finally:
        store.close()
    sr, heatmap = results["sr"], results["heatmap"]
    assert heatmap.SourceImageSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(top).SOPInstanceUID
    for result in (sr, heatmap):
        assert (result.PatientID, str(result.PatientName)) == ("PSEUDO-73", "Pseudo^One")
    assert (heatmap.PatientBirthDate, heatmap.PatientSex) == (sr.PatientBirthDate, sr.PatientSex)


def test_the_drift_marks_the_worker_remembers_stay_bounded_as_new_calling_ae_titles_come(safe_predictor, tmp_path, monkeypatch):
    """A calling AE title is the caller's to choose: before, each new one stayed in the worker's memory for good. One
    forgotten is written again when next seen, so the store's marks stay right."""
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, safe_predictor, [DESTINATION], study_timeout=60)
    try:
        flag_drift(worker.monitor, "ROOM_1")
        worker._share_drift("ROOM_1")
        for number in range(3 * drift.MAX_SOURCES):
            worker._share_drift(f"CALLER_{number}")
        assert len(worker._shared_drift) <= drift.MAX_SOURCES
        assert store.drifting_sources() == {"ROOM_1"}
        monkeypatch.setattr(worker.monitor.drift, "drifting", lambda source: False)  # ROOM_1 calm again
        worker._share_drift("ROOM_1")
        assert store.drifting_sources() == set()
    finally:
        store.close()
