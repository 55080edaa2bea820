"""A stopped node lets go of its ports: a node started again in the same process (a reload) can listen on them."""

from __future__ import annotations

import socket

import pytest

from medtriage.errors import ConfigError
from medtriage.serve.node.node import Node, NodeConfig
from medtriage.serve.node.sender import Peer
from tests.serve.test_serve_http import free_port


def _listen_on(port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
        probe.listen()


def _config(package_dir, tmp_path, port: int, metrics_port: int) -> NodeConfig:
    return NodeConfig(
        package=package_dir,
        state=tmp_path / "state",
        host="127.0.0.1",
        port=port,
        send_to=Peer.parse("PACS@127.0.0.1:1"),
        metrics_host="127.0.0.1",
        metrics_port=metrics_port,
    )


def test_a_stopped_node_frees_its_dicom_and_metrics_ports(package_dir, tmp_path):
    port, metrics_port = free_port(), free_port()
    config = _config(package_dir, tmp_path, port, metrics_port)
    node = Node(config)
    node.start()
    node.stop(drain_s=1)
    _listen_on(port)
    _listen_on(metrics_port)


def test_a_node_that_cannot_listen_stops_what_it_started(package_dir, tmp_path):
    """Before, the worker and sender threads ran on and the metrics port stayed taken when the DICOM port was: a
    node started again in the process (or its state folder) found them held."""
    port, metrics_port = free_port(), free_port()
    config = _config(package_dir, tmp_path, port, metrics_port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        node = Node(config)
        with pytest.raises(ConfigError, match="cannot listen"):
            node.start()
    assert not any(thread.is_alive() for thread in node._threads)
    _listen_on(metrics_port)
    Node(config).store.close()  # the state folder is free for another node
