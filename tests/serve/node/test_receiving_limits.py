"""What the node's Storage SCP answers when a received instance cannot be kept as sent: a data set of another SOP class
than its request, a SOP Instance UID already held for another study, a store that is full. Never success for what
it does not keep; each over a real association on loopback."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from medtriage.serve.node.scp import OUT_OF_RESOURCES, SUCCESS, start_scp
from medtriage.serve.node.store import SPOOL_DIR, NodeStore
from tests.serve.node.peers import NODE_AET, cr_study, free_port, send_files

CR = "1.2.840.10008.5.1.4.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
DATA_SET_MISMATCH, DUPLICATE_INSTANCE, CANNOT_UNDERSTAND = 0xA900, 0x0111, 0xC210  # C-STORE failures: PS3.4 Table B.2-1


@pytest.fixture
def node(tmp_path):
    """A Storage SCP on a free loopback port over a store in `tmp_path`: (store, port)."""
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    yield store, port
    server.shutdown()
    store.close()


def rewritten(path: Path, **values) -> Path:
    """The file at `path` with the elements named replaced (file meta ones only when named)."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds.file_meta if keyword.startswith("MediaStorage") else ds, keyword, value)
    ds.save_as(path)
    return path


def send_as_cr(port: int, path: Path, monkeypatch) -> int | None:
    """C-STORE `path` in a CR Image Storage context, as its file meta names it: pynetdicom sends a file's data set as
    it is (STORE_SEND_CHUNKED_DATASET), whatever SOP class the data set itself says."""
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        return getattr(assoc.send_c_store(path), "Status", None)
    finally:
        assoc.release()


def spooled(store: NodeStore) -> list[str]:
    return sorted(p.name for p in (store.folder / SPOOL_DIR).iterdir())


def test_a_data_set_of_another_sop_class_than_its_request_is_refused_not_stored(node, tmp_path, monkeypatch):
    store, port = node
    (path,) = cr_study(tmp_path / "in", 1, seed=61)
    sop = str(pydicom.dcmread(path).SOPInstanceUID)
    rewritten(path, SOPClassUID=BASIC_TEXT_SR)  # a text report sent in an image context
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID == CR
    assert send_as_cr(port, path, monkeypatch) == DATA_SET_MISMATCH
    assert not store.has_instance(sop) and spooled(store) == []


def test_a_sop_instance_uid_already_held_for_another_study_is_refused_not_dropped_in_silence(node, tmp_path):
    store, port = node
    (first,) = cr_study(tmp_path / "a", 1, seed=62)
    (other,) = cr_study(tmp_path / "b", 1, seed=63, patient="PSEUDO-2")
    sop = str(pydicom.dcmread(first).SOPInstanceUID)
    rewritten(other, SOPInstanceUID=sop, MediaStorageSOPInstanceUID=sop)  # another study's image under the same UID
    assert send_files(port, [first]) == {first: SUCCESS}
    assert send_files(port, [first]) == {first: SUCCESS}  # a resend of the same instance is kept once, and is no error
    assert send_files(port, [other]) == {other: DUPLICATE_INSTANCE}
    assert store.instance(sop)["study_uid"] == str(pydicom.dcmread(first).StudyInstanceUID)
    assert store.counts() == {"instances": {"received": 1}, "studies": {"receiving": 1}}


def test_an_instance_naming_a_held_study_under_another_patient_is_refused_not_merged(node, tmp_path):
    store, port = node
    first, second = cr_study(tmp_path / "a", 2, seed=64)
    (stranger,) = cr_study(tmp_path / "b", 1, seed=65, patient="PSEUDO-2")
    study = str(pydicom.dcmread(first).StudyInstanceUID)
    rewritten(stranger, StudyInstanceUID=study)  # another patient's image under the same Study Instance UID
    assert send_files(port, [first]) == {first: SUCCESS}
    assert send_files(port, [stranger, second]) == {stranger: CANNOT_UNDERSTAND, second: SUCCESS}
    assert not store.has_instance(str(pydicom.dcmread(stranger).SOPInstanceUID)) and len(spooled(store)) == 2
    assert store.counts() == {"instances": {"received": 2}, "studies": {"receiving": 1}}


def fill(store: NodeStore) -> None:
    """Cap the database at its size (SQLite's max_page_count), then record rows until it is full, as a full disk
    leaves it: the next row cannot be written."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for k in range(10_000):
            store.record_instance(f"2.25.{k}", f"2.25.{k}.1", "2.25.9", CR, "x.dcm", {"patient_id": "P" * 100})


def test_a_full_store_answers_out_of_resources_and_keeps_no_file_of_the_refused_instance(node, tmp_path):
    store, port = node
    (path,) = cr_study(tmp_path / "in", 1, seed=64)
    fill(store)
    assert send_files(port, [path]) == {path: OUT_OF_RESOURCES}
    assert spooled(store) == []  # the refused instance takes no disk: its sender sends it again
    store._db.execute("PRAGMA max_page_count = 1000000")  # space again
    assert send_files(port, [path]) == {path: SUCCESS}
    assert store.instance(str(pydicom.dcmread(path).SOPInstanceUID))["state"] == "received"
