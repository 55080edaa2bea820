"""Service metrics in Prometheus format, and the one call every door makes per scored or rejected input.

    monitor = ServiceMonitor(predictor.package)
    monitor.record(outcome, source="CR_ROOM_2", seconds=0.04)   # outcome: list[Score] | Rejection
    monitor.timed(score, data, name, source)                      # score(data, name), timed, recorded; a resend drifts once
    monitor.exposition()                                          # the /metrics body

Names (one `medtriage_` namespace): medtriage_scored_total, medtriage_rejected_total{reason},
medtriage_refused_total{reason}, medtriage_failed_total{reason} (work failed by an error of the service itself: an
HTTP request answered 500, a file the scorer itself failed on, a step of the DICOM node's worker, each attempt),
medtriage_scoring_seconds (histogram), medtriage_drift_psi{source,feature},
medtriage_drift_threshold{source} (the PSI threshold the source is judged by: its training site's, else the pooled one),
medtriage_drift_alert{source} (1 while the source drifts past that threshold).
Each monitor has its own registry, so several services (or tests) in one process do not collide.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from medtriage.serve.drift import DriftMonitor, input_features, source_name
from medtriage.serve.package import ModelPackage
from medtriage.serve.predictor import Rejection
from medtriage.serve.scope import OUT_OF_SCOPE

NAMESPACE = "medtriage"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
SOURCE_HEADER = "X-Source"  # over HTTP, the sender names itself here (the DICOM node uses the calling AE title)


# Where a CamelCase name splits into words: before an upper-case letter that follows a lower-case one or a digit,
# and before the last capital of an acronym (OSError -> os_error, not o_s_error).
_WORD_START = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def rejection_reason(rejection: Rejection) -> str:
    """A low-cardinality label: the rejection's code, else its error type in snake case (dicom_error, os_error, ...)."""
    return rejection.code or snake_case(rejection.error)


def snake_case(type_name: str) -> str:
    """An error type's name as a label value: OSError -> os_error, WorklistWriteError -> worklist_write_error."""
    return _WORD_START.sub("_", type_name).lower() or "unknown"


class ServiceMonitor:
    """Counts, latency and drift of one serving process (HTTP app or DICOM node); thread-safe."""

    def __init__(self, package: ModelPackage, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.drift = DriftMonitor(package.meta.get("drift"))
        kw = {"namespace": NAMESPACE, "registry": self.registry}
        self.scored = Counter("scored", "Images scored (one per frame)", **kw)
        self.rejected = Counter("rejected", "Inputs refused, by reason", ["reason"], **kw)
        self.refused = Counter(
            "refused", "HTTP requests refused before any work (busy, too_large, unauthorised, cross_site, wrong_host)", ["reason"], **kw
        )
        self.failed = Counter(
            "failed",
            "Work failed by an error of the service itself (HTTP 500, a DICOM node worker step), by the error's type",
            ["reason"],
            **kw,
        )
        self.latency = Histogram("scoring_seconds", "Time to decode and score one input", buckets=LATENCY_BUCKETS, **kw)
        self.psi = Gauge(
            "drift_psi", "Population-stability index of a source's rolling window against the reference", ["source", "feature"], **kw
        )
        self.alert = Gauge("drift_alert", "1 while the source drifts past its PSI threshold", ["source"], **kw)
        # A source named after a training site is judged by that site's threshold: a rule comparing drift_psi with the
        # one pooled drift_psi_threshold would judge it by the wrong one. Labelled as drift_alert, for `ignoring(feature)`.
        self.threshold = Gauge(
            "drift_threshold", "PSI above which the source drifts (its training site's threshold, else the pooled one)", ["source"], **kw
        )
        # A short window's PSI is large by chance (a first image's is far past any threshold): an alert rule on the
        # PSI itself needs the window, and compares only from drift_min_images on, as drift_alert does.
        self.window = Gauge("drift_window", "Inputs in the source's rolling window", ["source"], **kw)
        if self.drift.enabled:  # without references nothing drifts: no threshold to show
            Gauge(
                "drift_psi_threshold",
                "PSI above which a source compared with the pooled reference drifts (each source's own: drift_threshold)",
                **kw,
            ).set(self.drift.threshold)
            Gauge("drift_min_images", "Inputs a window holds before its PSI can raise drift_alert", **kw).set(self.drift.min_images)
        self._labelled: dict[str, set] = {}  # source -> features with a psi series, to drop them with the source
        self._lock = threading.Lock()

    def record(self, outcome, source: str | None = None, seconds: float | None = None, key: str | None = None) -> None:
        """One input's outcome (list of Scores, or a Rejection) from `source`, and how long it took. `key` names the
        input for the drift monitor, which counts an input a source sent before only once (None: always counted).
        Scored and rejected counts are of the work done, so a resend counts there again."""
        if seconds is not None:
            self.latency.observe(seconds)
        source = source_name(source)
        if isinstance(outcome, Rejection):
            self.rejected.labels(reason=rejection_reason(outcome)).inc()
            if outcome.internal:  # the service failed, not the file: counted as failure too, for failure alerts
                self.failed.labels(reason=snake_case(outcome.error)).inc()
            self._observe(outcome.withheld or [], source, key)  # an unusual image is part of what a source sends
            return
        self.scored.inc(len(outcome))
        self._observe(outcome, source, key)

    def _observe(self, scores, source: str, key: str | None = None) -> None:
        # Out-of-scope images (scored only under --allow-out-of-scope) are not what the references describe: left
        # out, so that the flag does not change whether a source drifts. Unusual in-scope images do count.
        scores = [score for score in scores if not any(flag.startswith(OUT_OF_SCOPE) for flag in score.flags)]
        if not scores:  # refused before inference, or out of scope: nothing to compare
            return
        state = self.drift.observe(source, input_features(scores), key)
        if state is not None:
            self._publish(state)

    def _publish(self, state) -> None:
        with self._lock:
            self._publish_locked(state)

    def _publish_locked(self, state) -> None:
        for feature, value in state.psi.items():
            self.psi.labels(source=state.source, feature=feature).set(value)
        self._labelled.setdefault(state.source, set()).update(state.psi)
        self.alert.labels(source=state.source).set(float(state.drifting(self.drift.min_images)))
        self.threshold.labels(source=state.source).set(state.threshold)
        self.window.labels(source=state.source).set(state.window)
        if len(self._labelled) > len(self.drift.sources()):  # the monitor let a source go: so do the series
            for gone in set(self._labelled) - self.drift.sources():
                for feature in self._labelled.pop(gone):
                    self.psi.remove(gone, feature)
                self.alert.remove(gone)
                self.threshold.remove(gone)
                self.window.remove(gone)

    def count_failure(self, err: BaseException) -> None:
        """An error of the service itself, counted by its type only: its message may name files or data."""
        self.failed.labels(reason=snake_case(type(err).__name__)).inc()

    def timed(self, score, data: bytes, name: str, source: str | None = None):
        """`score(data, name)` (a score_or_reject), timed and recorded; returns its outcome."""
        started = time.perf_counter()
        outcome = score(data, name)
        self.record(outcome, source, time.perf_counter() - started, input_key(outcome, data))
        return outcome

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def input_key(outcome, data: bytes) -> str | None:
    """What names an input for the drift monitor: its SOP Instance UID, by which the worklist too knows a resend (a
    retry may come re-encoded, or with other private elements), else the sha256 of its bytes; None when it has no
    scores for the monitor, so that a refused file is not hashed for nothing."""
    scores = (outcome.withheld or []) if isinstance(outcome, Rejection) else outcome
    if not scores:
        return None
    uid = next((score.sop_uid for score in scores if score.sop_uid), "")
    return f"sop:{uid}" if uid else f"sha256:{hashlib.sha256(data).hexdigest()}"


def monitoring_router(monitor: ServiceMonitor) -> APIRouter:
    """GET /metrics (Prometheus text format) and GET /v1/drift (per-source drift, for the worklist banner)."""
    router = APIRouter()

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    def metrics() -> Response:
        return Response(monitor.exposition(), media_type=CONTENT_TYPE)

    @router.get("/v1/drift", summary="Input drift per source against the package's reference distributions")
    def drift() -> dict:
        return monitor.drift.status()

    return router
