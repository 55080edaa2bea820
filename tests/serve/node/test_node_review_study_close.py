"""When a study is closed: an instance that arrives while the worker is closing its study is in a report, never left
out of every one; a wall clock set back (an NTP step, a restored virtual machine) neither holds a quiet study open nor
a failed result back until it catches up."""

from __future__ import annotations

import time

import pydicom

from medtriage.serve.node.sender import Sender
from medtriage.serve.node.store import NodeStore
from tests.serve.node.peers import cr_study, referenced_sops

HOUR = 3600.0


def _study_uid(path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID


def _reported(store: NodeStore, study_uid: str) -> list[list[str]]:
    """The SOP instances each SR of the study references, in the order the SRs were made."""
    rows = store._execute("SELECT DISTINCT file FROM deliveries WHERE study_uid = ? AND kind = 'sr' ORDER BY id", (study_uid,))
    return [sorted(referenced_sops(pydicom.dcmread(store.outbox_path(row["file"])))) for row in rows]


def _state(store: NodeStore, study_uid: str) -> str:
    return store._execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,))[0]["state"]


def test_an_instance_arriving_after_its_study_was_found_quiet_is_in_its_report(
    node_store, node_worker, receive_file, tmp_path, monkeypatch
):
    """Before, the worker closed the study without it (it was not scored yet) and never again: the instance, scored
    later, was in no SR, and an URGENT image among late ones went unreported."""
    first, late = cr_study(tmp_path / "in", 2, seed=31)
    study_uid = _study_uid(first)
    sops = [receive_file(first)]
    time.sleep(0.01)
    assert node_worker.score_queued()
    quiet = node_store.quiet_studies

    def arriving(seconds):  # the study found quiet, then its next instance comes before the worker closes it
        found = quiet(seconds)
        sops.append(receive_file(late))
        return found

    monkeypatch.setattr(node_store, "quiet_studies", arriving)
    node_worker.close_quiet_studies()
    monkeypatch.undo()
    assert _state(node_store, study_uid) == "receiving" and _reported(node_store, study_uid) == []
    time.sleep(0.01)
    assert node_worker.score_queued()
    time.sleep(0.01)
    assert node_worker.close_quiet_studies()
    assert _state(node_store, study_uid) == "scored"
    assert _reported(node_store, study_uid) == [sorted(sops)]


def test_an_instance_committed_after_the_worker_read_its_study_makes_the_close_refused(
    node_store, node_worker, receive_file, tmp_path, monkeypatch
):
    """Another process (the worklist recording an upload) takes an instance's arrival time before the worker's look
    and commits it after the worker read the study. Before, the close went through without that instance."""
    first, late = cr_study(tmp_path / "in", 2, seed=32)
    study_uid = _study_uid(first)
    sops = [receive_file(first)]
    time.sleep(0.01)
    assert node_worker.score_queued()
    time.sleep(0.01)
    read = node_store.study_instances

    def arriving_unseen(uid):
        rows = read(uid)
        sops.append(receive_file(late))  # its arrival as it was when the worker looked
        node_store._execute("UPDATE studies SET last_received = last_received - 0.005 WHERE study_uid = ?", (uid,))
        return rows

    monkeypatch.setattr(node_store, "study_instances", arriving_unseen)
    node_worker.close_quiet_studies()
    monkeypatch.undo()
    assert _state(node_store, study_uid) == "receiving" and _reported(node_store, study_uid) == []
    assert node_worker.score_queued()
    time.sleep(0.01)
    assert node_worker.close_quiet_studies()
    assert _reported(node_store, study_uid) == [sorted(sops)]


def test_a_study_received_before_the_clock_was_set_back_is_closed_after_its_timeout(
    node_store, node_worker, receive_file, tmp_path, caplog
):
    """Before, it stayed open (no SR) until the clock caught up with its last arrival: an hour for an hour's step."""
    (path,) = cr_study(tmp_path / "in", 1, seed=33)
    study_uid = _study_uid(path)
    node_worker.study_timeout = 0.05  # a timeout to wait out once the clock is back
    sop = receive_file(path)
    assert node_worker.score_queued()
    # received at what the clock said then: an hour later than it says now
    node_store._execute("UPDATE studies SET last_received = last_received + ?", (HOUR,))
    with caplog.at_level("WARNING", logger="medtriage.serve.node.worker"):
        assert not node_worker.close_quiet_studies()  # quiet from now on, not yet for the timeout
    assert any("clock was set back" in record.getMessage() for record in caplog.records)
    time.sleep(0.1)
    assert node_worker.close_quiet_studies()
    assert _state(node_store, study_uid) == "scored" and _reported(node_store, study_uid) == [[sop]]


class _Recording:
    """A destination that stores whatever it is sent."""

    def __init__(self):
        self.sent: list[int] = []

    def send(self, deliveries):
        self.sent += [d.id for d in deliveries]
        return {d.id: None for d in deliveries}


def test_a_result_whose_retry_was_set_before_the_clock_went_back_is_tried_within_the_retry_limit(
    node_store, node_worker, receive_file, tmp_path
):
    """Before, a result that failed once waited for the clock to catch up: an hour more for an hour's step."""
    (path,) = cr_study(tmp_path / "in", 1, seed=34)
    destination = _Recording()
    (pacs,) = node_worker.destinations
    sender = Sender(node_store, {pacs: destination}, retry_max=60)
    receive_file(path)
    assert node_worker.score_queued()
    time.sleep(0.01)
    assert node_worker.close_quiet_studies()
    (delivery,) = node_store.due_deliveries()
    node_store.set_attempt_failed(delivery, "PACS down", time.time() + 30)  # an ordinary backoff stays as it is
    assert not sender.send_due() and destination.sent == []
    # it failed, its retry due in 30 s by the clock of then: the clock now says an hour earlier
    node_store.set_attempt_failed(delivery, "PACS down", time.time() + HOUR + 30)
    assert node_store.due_deliveries() == []
    assert sender.send_due() and destination.sent == [delivery.id]
    assert node_store.counts()["studies"] == {"delivered": 1}
