"""Stopping the node (SIGTERM from systemd): an association in progress ends with its instances stored and
answered, not refused because the store closed under it; one that does not end in time is aborted."""

from __future__ import annotations

import threading
import time

import pydicom
from pynetdicom import AE

from medtriage.serve.node.node import Node, NodeConfig
from medtriage.serve.node.sender import Peer
from tests.serve.node.peers import NODE_AET, cr_study
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
