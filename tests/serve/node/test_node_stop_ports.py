"""A stopped node lets go of its ports: a node started again in the same process (a reload) can listen on them."""

from __future__ import annotations

import socket

from medtriage.serve.node.node import Node, NodeConfig
from medtriage.serve.node.sender import Peer
from tests.serve.test_serve_http import free_port


def _listen_on(port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_a_stopped_node_frees_its_dicom_and_metrics_ports(package_dir, tmp_path):
    port, metrics_port = free_port(), free_port()
    config = NodeConfig(
        package=package_dir,
        state=tmp_path / "state",
        host="127.0.0.1",
        port=port,
        send_to=Peer.parse("PACS@127.0.0.1:1"),
        metrics_host="127.0.0.1",
        metrics_port=metrics_port,
    )
    node = Node(config)
    node.start()
    node.stop(drain_s=1)
    _listen_on(port)
    _listen_on(metrics_port)
