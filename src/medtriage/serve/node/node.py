"""The node assembled: store, SCP, worker and sender threads, from one NodeConfig."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from medtriage.serve.batching import enable_batching
from medtriage.serve.metrics import ServiceMonitor
from medtriage.serve.node.scp import start_scp
from medtriage.serve.node.sender import DicomWebSender, DimseSender, Peer, Sender
from medtriage.serve.node.store import ASSOCIATE_WITHIN_S, MAX_ASSOCIATIONS, MAX_INSTANCE_BYTES, MIN_FREE_BYTES, NodeStore
from medtriage.serve.node.worker import Worker
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from medtriage.serve.tls import tls_context

log = logging.getLogger(__name__)
DRAIN_S = 20.0  # on stop, how long associations in progress may go on (systemd's default stop timeout is 90 s)
ABORT_JOIN_S = 5.0  # then how long the aborted associations get to end
STOP_JOIN_S = 30.0  # then how long the worker and the sender together get to finish the steps in hand


@dataclass
class NodeConfig:
    package: str | Path
    state: str | Path
    aet: str = "MEDTRIAGE"
    host: str = "0.0.0.0"
    port: int = 11112
    send_to: Peer | None = None
    dicomweb: str | None = None
    allowed_callers: list[str] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    study_timeout: float = 10.0
    heatmaps: bool = False
    retry_max: float = 60.0
    provider: str = "cpu"
    threads: int | None = None
    allow_out_of_scope: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    reduced_j2k: bool = False  # JPEG 2000 decoded only to the level the model needs (serve/predictor.py)
    max_batch: int = 1  # > 1: instances scored side by side share ORT calls (serve/batching.py)
    batch_wait_ms: float = 5.0
    max_instance_bytes: int = MAX_INSTANCE_BYTES  # a larger C-STORE is refused with 0xA700 (out of resources)
    min_free_bytes: int = MIN_FREE_BYTES  # so is one arriving when the state folder's disk has less free
    max_associations: int = MAX_ASSOCIATIONS  # connections served at once; one more is refused
    associate_timeout: float = ASSOCIATE_WITHIN_S  # a connection without its whole association request by then is closed


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.predictor = Predictor(
            load_package(config.package),
            provider=config.provider,
            threads=config.threads,
            allow_out_of_scope=config.allow_out_of_scope,
            reduced_j2k=config.reduced_j2k,
        )
        self.store = NodeStore(config.state, recover=True)
        self.tls = tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        senders: dict = {}
        if config.send_to:
            senders[str(config.send_to)] = DimseSender(config.send_to, config.aet)
        if config.dicomweb:
            senders[config.dicomweb] = DicomWebSender(config.dicomweb)
        self.destinations = list(senders)
        self.monitor = ServiceMonitor(self.predictor.package)
        self.batcher = enable_batching(self.predictor, config.max_batch, config.batch_wait_ms)
        if self.batcher is not None:
            self.batcher.expose(self.monitor.registry)
        self.worker = Worker(
            self.store,
            self.predictor,
            self.destinations,
            config.study_timeout,
            config.heatmaps,
            monitor=self.monitor,
            at_once=max(1, config.max_batch),
        )
        self.sender = Sender(self.store, senders, retry_max=config.retry_max)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._metrics = None

    def start(self) -> None:
        """Resume queued work, then accept associations. A start that fails (the port taken) stops what it started:
        the node is stopped, its threads, metrics port and state folder released."""
        log.info("resuming: %s", self.store.counts())
        self.sender.say_unsent_elsewhere()
        self._threads = [
            threading.Thread(target=part.run, args=(self._stop,), name=name, daemon=True)
            for name, part in (("medtriage-worker", self.worker), ("medtriage-sender", self.sender))
        ]
        for thread in self._threads:
            thread.start()
        try:
            self._listen()
        except BaseException:
            self.stop(drain_s=0)
            raise

    def _listen(self) -> None:
        if self.config.metrics_port is not None:
            self._metrics = start_metrics_server(self.monitor, self.config.metrics_host, self.config.metrics_port)
        config = self.config
        self._server = start_scp(
            self.store,
            config.aet,
            config.host,
            config.port,
            config.allowed_callers,
            self.tls,
            config.max_instance_bytes,
            config.min_free_bytes,
            config.max_associations,
            config.associate_timeout,
        )

    def stop(self, drain_s: float = DRAIN_S) -> None:
        if self._server is not None:
            self._server.shutdown()  # no new associations
            drain(self._server, drain_s)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()  # the port is free for a node started again in this process
        self._stop.set()
        ended = self._join_parts()
        if self.batcher is not None and ended:  # a part still in an inference call would hold the batcher's own wait
            self.batcher.close()
        self.store.close()

    def _join_parts(self) -> bool:
        """Wait for the worker, the sender and the scorings side by side (--max-batch): STOP_JOIN_S for all of them,
        as each its own would add up past systemd's stop timeout. Whether all ended: what one still does then is not
        recorded (StoreClosed ends it), and is done again at the next start."""
        deadline = time.monotonic() + STOP_JOIN_S
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0))
            if thread.is_alive():  # a destination or a scoring slower than the wait
                log.warning(
                    "stopping: %s still busy after %.0f s; what it does now is not recorded, and is done again at the next start",
                    thread.name,
                    STOP_JOIN_S,
                )
        scored = self.worker.close(timeout=max(deadline - time.monotonic(), 0))
        return scored and not any(thread.is_alive() for thread in self._threads)


def drain(server, seconds: float) -> None:
    """Let the associations in progress end (a modality mid-study gets its answers, each after its instance is
    stored), then abort those still open: their sender keeps what got no success and sends it again."""
    deadline = time.monotonic() + seconds
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    for association in server.active_associations:
        log.warning("stopping: association with %s aborted after %.0f s", association.requestor.ae_title, seconds)
        association.abort()
    joined_by = time.monotonic() + ABORT_JOIN_S  # one wait for all: each its own would add up with their number
    for association in server.active_associations:
        association.join(timeout=max(joined_by - time.monotonic(), 0))  # before the store closes under it


def start_metrics_server(monitor: ServiceMonitor, host: str, port: int):
    """GET /metrics (Prometheus text format) on its own port; holds no PHI (counts and AE titles only)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=monitor.registry)
    return server
