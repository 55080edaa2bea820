"""The DICOM node counts its own failures on its /metrics port by the error's type, as the HTTP service counts its
500s: a state folder whose database refuses writes (each attempt to store a result), and a study whose report cannot
be written to the outbox."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import httpx
from prometheus_client.parser import text_string_to_metric_families

from medtriage.serve.node.node import Node, NodeConfig
from medtriage.serve.node.store import OUTBOX_DIR
from tests.serve.node.peers import cr_study, free_port, wait_for
from tests.serve.node.test_node_reports import _receive
from tests.serve.test_failure_metrics import failed


class Metrics:
    """A node's /metrics on loopback, read as its failures by reason and its scored count."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/metrics"

    def failed(self) -> dict[str, float]:
        return failed(httpx.get(self.url, timeout=10).text)

    def scored(self) -> float:
        families = text_string_to_metric_families(httpx.get(self.url, timeout=10).text)
        return next(s.value for family in families for s in family.samples if s.name == "medtriage_scored_total")


@contextmanager
def _started_with_one_instance(package_dir, tmp_path):
    """A node serving /metrics on loopback with one CR instance received; the test sets up its fault, then starts it."""
    metrics_port = free_port()
    config = NodeConfig(
        package=package_dir,
        state=tmp_path / "state",
        host="127.0.0.1",
        port=free_port(),
        study_timeout=0,
        metrics_host="127.0.0.1",
        metrics_port=metrics_port,
    )
    node = Node(config)
    (path,) = cr_study(tmp_path / "in", 1, seed=5)
    _receive(node.store, path, "1.2.826.0.1.3680043.8.498.5")
    try:
        yield node, Metrics(metrics_port)
    finally:
        node.stop(drain_s=1)


def _refuse_writes(node: Node, refused: bool) -> None:
    with node.store._lock:  # SQLite refuses every write, as with a read-only database file
        node.store._db.execute(f"PRAGMA query_only = {'ON' if refused else 'OFF'}")


def test_a_result_the_node_cannot_store_is_counted_as_failed_by_type(package_dir, tmp_path):
    """Before, the worker only logged it: the node's /metrics showed no failure while nothing got scored."""
    with _started_with_one_instance(package_dir, tmp_path) as (node, metrics):
        _refuse_writes(node, True)
        node.start()
        wait_for(metrics.failed, 30, "a failure on the node's /metrics")
        assert set(metrics.failed()) == {"operational_error"}  # sqlite3.OperationalError: its type, never its message
        assert metrics.scored() == 0
        _refuse_writes(node, False)  # the instance stayed queued: the next attempt stores it
        wait_for(metrics.scored, 30, "the instance scored")


def test_a_report_the_node_cannot_write_is_counted_as_failed_by_type(package_dir, tmp_path):
    with _started_with_one_instance(package_dir, tmp_path) as (node, metrics):
        outbox = node.store.folder / OUTBOX_DIR
        shutil.rmtree(outbox)
        outbox.write_bytes(b"")  # a file where the outbox folder should be
        node.start()
        wait_for(lambda: node.store.counts()["studies"].get("failed"), 30, "the study closed as failed")
        assert metrics.failed() == {"file_exists_error": 1.0} and metrics.scored() == 1
