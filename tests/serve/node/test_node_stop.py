"""Stopping the node (SIGTERM from systemd): an association in progress ends with its instances stored and
answered, not refused because the store closed under it; one that does not end in time is aborted."""

from __future__ import annotations

import threading
import time

import pydicom
from pynetdicom import AE

from medtriage.serve.node import node as node_module
from medtriage.serve.node.node import Node, NodeConfig
from medtriage.serve.node.sender import Peer
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.serve.node.peers import NODE_AET, cr_study
from tests.serve.node.test_node_dropped_and_unreachable import _study_with_its_sr_due
from tests.serve.test_serve_http import free_port


def _association(port: int, paths):
    ae = AE(ae_title="MODALITY")
    for path in paths:
        ae.add_requested_context(str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    association = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert association.is_established
    return association


def _node(package_dir, state, port: int) -> Node:
    config = NodeConfig(package=package_dir, state=state, host="127.0.0.1", port=port, send_to=Peer.parse("PACS@127.0.0.1:1"))
    node = Node(config)
    node.start()
    return node


def test_a_stop_lets_the_association_in_progress_finish_storing(package_dir, tmp_path):
    first, second = cr_study(tmp_path / "in", 2, seed=7)
    port = free_port()
    node = _node(package_dir, tmp_path / "state", port)
    association = _association(port, [first, second])
    assert association.send_c_store(first).Status == 0x0000
    stopping = threading.Thread(target=node.stop, kwargs={"drain_s": 10})
    stopping.start()
    time.sleep(0.5)  # the node has stopped accepting; the modality sends the rest of its study
    assert association.send_c_store(second).Status == 0x0000
    association.release()
    stopping.join(timeout=30)
    assert not stopping.is_alive()
    reopened = _node(package_dir, tmp_path / "state", free_port())  # both are on record for the next start
    try:
        assert sum(reopened.store.counts()["instances"].values()) == 2
    finally:
        reopened.stop()


def test_an_association_that_outlasts_the_drain_is_aborted(package_dir, tmp_path):
    (path,) = cr_study(tmp_path / "in", 1, seed=8)
    port = free_port()
    node = _node(package_dir, tmp_path / "state", port)
    association = _association(port, [path])
    started = time.monotonic()
    node.stop(drain_s=1)
    assert time.monotonic() - started < 15
    association.join(timeout=5)  # the requestor's side ends when the node aborts
    assert not association.is_established


class HeldDestination:
    """A PACS that takes its time to answer: the sender is mid-send when the node stops."""

    def __init__(self):
        self.entered, self.answer = threading.Event(), threading.Event()

    def send(self, deliveries):
        self.entered.set()
        self.answer.wait(timeout=30)
        return dict.fromkeys((d.id for d in deliveries), None)


def test_a_sender_outliving_the_stop_ends_with_a_warning_and_its_result_stays_pending(package_dir, tmp_path, monkeypatch, caplog):
    """Before, its answer met the closed store and was logged as a failed delivery with a traceback."""
    destination = "PACS@127.0.0.1:1"
    _study_with_its_sr_due(tmp_path, destination).close()
    node = Node(
        NodeConfig(package=package_dir, state=tmp_path / "state", host="127.0.0.1", port=free_port(), send_to=Peer.parse(destination))
    )
    held = node.sender.senders[destination] = HeldDestination()
    monkeypatch.setattr(node_module, "STOP_JOIN_S", 0.2)
    node.start()
    assert held.entered.wait(timeout=10)
    with caplog.at_level("WARNING"):
        node.stop(drain_s=0)
        held.answer.set()
        (sender,) = [thread for thread in node._threads if thread.name == "medtriage-sender"]
        sender.join(timeout=10)
    assert not sender.is_alive()
    assert not [record for record in caplog.records if record.exc_info or record.levelname == "ERROR"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("medtriage-sender still busy after 0 s" in message for message in messages)
    assert any("was closed: the node is stopping; the results being sent stay pending" in message for message in messages)
    reopened = NodeStore(tmp_path / "state")
    try:
        (delivery,) = reopened.due_deliveries()  # sent again at the next start
        assert delivery.destination == destination
    finally:
        reopened.close()


def test_a_worker_meeting_the_closed_store_ends_with_a_warning(package_dir, tmp_path, caplog):
    """As the sender: a scoring that outlived the stop ends without a traceback; its instance stays queued."""
    store = NodeStore(tmp_path / "state")
    worker = Worker(store, Predictor(load_package(package_dir)), [], study_timeout=10, heatmaps=False)
    store.close()
    finished = threading.Thread(target=worker.run, args=(threading.Event(),))
    with caplog.at_level("WARNING"):
        finished.start()
        finished.join(timeout=10)
    assert not finished.is_alive()
    (record,) = [record for record in caplog.records if record.name == "medtriage.serve.node.worker"]
    assert record.levelname == "WARNING" and not record.exc_info and "stay queued" in record.getMessage()
