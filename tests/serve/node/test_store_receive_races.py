"""Concurrent receipts of one SOP Instance UID on one store: exactly one copy is kept and answered success; the other
is a resend (False) or, naming another study, refused as a conflict. Real threads, lined up with a barrier right
after each has found the UID not yet held, so both then race to record it."""

from __future__ import annotations

import tempfile
import threading

import pydicom
import pytest

from medtriage.io.safe_output import write_atomic
from medtriage.serve.node.scp import SUCCESS, start_scp
from medtriage.serve.node.store import SPOOL_DIR, ConflictingInstance, ConflictingPatient, NodeStore
from tests.serve.node.peers import NODE_AET, cr_study, free_port, send_files

CR = "1.2.840.10008.5.1.4.1.1.1"
FIELDS = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "CR"}
SOP = "2.25.4242"


class LinedUpStore(NodeStore):
    """Holds the first two receivers just after they found the UID not held, until both have: the interleaving in
    which two associations send one new instance at the same moment."""

    def __init__(self, folder):
        super().__init__(folder)
        self.barrier = threading.Barrier(2, timeout=5)

    def has_instance(self, sop_uid: str) -> bool:
        held = super().has_instance(sop_uid)
        if threading.current_thread().name.startswith("sender"):  # each receive asks once
            self.barrier.wait()
        return held


def receive_together(store: NodeStore, calls: list[tuple], sops: tuple[str, str] = (SOP, SOP)) -> list[object]:
    """Each (data, study[, fields]) received on its own thread at once, under the SOP UID `sops` gives it; what each
    returned or raised, in order."""
    outcomes: list[object] = [None] * len(calls)

    def send(k: int, data: bytes, study: str, fields: dict = FIELDS) -> None:
        try:
            outcomes[k] = store.receive(data, sops[k], study, "2.25.7", CR, fields, calling_aet=f"AE{k}")
        except Exception as err:  # noqa: BLE001 -- what the C-STORE handler would answer is the point
            outcomes[k] = err

    threads = [threading.Thread(target=send, args=(k, *call), name=f"sender{k}") for k, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return outcomes


def spool_files(store: NodeStore) -> list:
    return sorted((store.folder / SPOOL_DIR).iterdir())


@pytest.fixture
def store(tmp_path):
    store = LinedUpStore(tmp_path / "state")
    yield store
    store.close()


def test_two_copies_of_one_new_instance_at_once_keep_one_file_and_one_success(store):
    outcomes = receive_together(store, [(b"copy-from-AE0", "2.25.1"), (b"copy-from-AE1", "2.25.1")])
    assert sorted(outcomes, key=str) == [False, True]  # the second is a resend: no second result
    winner = outcomes.index(True)
    (kept,) = spool_files(store)  # no temporary left behind
    assert kept.read_bytes() == f"copy-from-AE{winner}".encode()  # the file is the recorded sender's, not overwritten
    assert store.instance(SOP)["calling_aet"] == f"AE{winner}"
    assert store.counts() == {"instances": {"received": 1}, "studies": {"receiving": 1}}


def test_another_study_under_the_same_new_uid_at_once_is_refused_not_answered_success(store):
    outcomes = receive_together(store, [(b"study-one", "2.25.1"), (b"study-two", "2.25.2")])
    assert sum(outcome is True for outcome in outcomes) == 1
    (refused,) = [outcome for outcome in outcomes if outcome is not True]
    assert isinstance(refused, ConflictingInstance)
    winner = outcomes.index(True)
    (kept,) = spool_files(store)
    assert kept.read_bytes() == (b"study-one", b"study-two")[winner]
    assert store.instance(SOP)["study_uid"] == ("2.25.1", "2.25.2")[winner]
    assert store.counts()["studies"] == {"receiving": 1}  # the refused instance opened no study


def test_two_patients_instances_of_one_new_study_at_once_keep_one_patient(store):
    """Both pass the check made before spooling (the study is not held yet); the one made in the transaction refuses
    the second, so no study holds two patients' images."""
    calls = [(b"patient-one", "2.25.1", FIELDS), (b"patient-two", "2.25.1", {**FIELDS, "patient_id": "Q"})]
    outcomes = receive_together(store, calls, sops=(SOP, SOP + "1"))
    assert sum(outcome is True for outcome in outcomes) == 1
    (refused,) = [outcome for outcome in outcomes if outcome is not True]
    assert isinstance(refused, ConflictingPatient)
    (kept,) = spool_files(store)
    assert kept.read_bytes() == (b"patient-one", b"patient-two")[outcomes.index(True)]
    assert store.counts() == {"instances": {"received": 1}, "studies": {"receiving": 1}}


def test_an_instance_in_the_incoming_folder_is_moved_into_the_spool_not_copied(store):
    buffered = store.incoming / "tmpabc.dcm"
    buffered.write_bytes(b"arrived")
    inode = buffered.stat().st_ino
    assert store.receive(buffered, SOP, "2.25.1", "2.25.7", CR, FIELDS)
    (kept,) = spool_files(store)
    assert kept.stat().st_ino == inode and kept.read_bytes() == b"arrived" and not buffered.exists()
    assert store.receive(b"copied", "2.25.4243", "2.25.1", "2.25.7", CR, FIELDS)
    assert {path.stat().st_mode for path in spool_files(store)} == {kept.stat().st_mode}  # the same permissions
    resent = store.incoming / "tmpdef.dcm"
    resent.write_bytes(b"again")
    assert not store.receive(resent, SOP, "2.25.1", "2.25.7", CR, FIELDS)
    assert resent.read_bytes() == b"again" and kept.read_bytes() == b"arrived"  # left to its writer, the spool unchanged


def test_an_instance_received_over_an_association_is_spooled_from_incoming_and_answered_success(tmp_path, monkeypatch):
    """pynetdicom deletes its incoming file after the handler: one already moved into the spool is no error."""
    store = NodeStore(tmp_path / "state")
    monkeypatch.setattr(tempfile, "tempdir", str(store.incoming))  # as `medtriage listen` sets it
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    try:
        (path,) = cr_study(tmp_path / "in", 1, seed=64)
        assert send_files(port, [path]) == {path: SUCCESS}
    finally:
        server.shutdown()
    (kept,) = spool_files(store)
    assert list(store.incoming.iterdir()) == []
    reference = write_atomic(tmp_path / "reference", b"")  # what the node's other written files get
    assert kept.stat().st_mode == reference.stat().st_mode  # not the incoming temporary file's 0600
    assert pydicom.dcmread(kept).SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID
    store.close()
