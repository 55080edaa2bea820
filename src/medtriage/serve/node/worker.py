"""Scores what the SCP queued and closes studies: after `study_timeout` quiet seconds a study's result is
its most urgent instance, and one SR (plus, optionally, a heatmap Secondary Capture) referencing every
scored instance goes to the outbox with one delivery row per destination. A study with nothing scored
is "not analysed" with its reasons, and no SR is sent for it."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator

from pydicom import Dataset
from pydicom.uid import generate_uid

from medtriage.errors import MedTriageError
from medtriage.io.header_warnings import reading
from medtriage.io.safe_output import write_atomic
from medtriage.serve.dicom_results import build_study_sr, encoded, patient_source, read_header
from medtriage.serve.drift import MAX_SOURCES, source_name
from medtriage.serve.metrics import ServiceMonitor
from medtriage.serve.node.store import UNWRITTEN, CommitUncertain, NodeStore, StoreClosed, backoff, digest_name
from medtriage.serve.predictor import Predictor, Rejection, Score

log = logging.getLogger(__name__)
PRIORITY_RANK = {"URGENT": 0, "review": 1, "routine": 2}
STEP_RETRY_MAX_S = 30.0  # the longest wait before a failed step (scoring, closing studies) is tried again


def urgency(score: dict) -> tuple:
    """Sort key: URGENT before review before routine, then the higher probability."""
    return PRIORITY_RANK.get(score["priority"], len(PRIORITY_RANK)), -score["probability"]


def as_score(record: dict) -> Score:
    return Score(**{key: value for key, value in record.items() if key != "status"})


def rejection_summary(reasons: list[str]) -> str:
    """'2 instance(s): truncated pixel data; 1 instance(s): not an image' — the reasons, commonest first."""
    return "; ".join(f"{n} instance(s): {reason}" for reason, n in Counter(reasons).most_common(3))


class Worker:
    def __init__(
        self,
        store: NodeStore,
        predictor: Predictor,
        destinations: list[str],
        study_timeout: float,
        heatmaps: bool = False,
        poll_seconds: float = 0.2,
        monitor: ServiceMonitor | None = None,
        at_once: int = 1,
    ):
        self.store, self.predictor, self.destinations = store, predictor, destinations
        # Counts, latency and drift per calling AE title (the node's sources); /metrics when --metrics-port is set.
        self.monitor = monitor or ServiceMonitor(predictor.package)
        self.study_timeout, self.heatmaps, self.poll_seconds = study_timeout, heatmaps, poll_seconds
        # With batching on, `at_once` queued instances are decoded side by side, so that their inference
        # calls reach the predictor's BatchingSession together and can share one ORT call.
        self.at_once = at_once
        self._scoring: list[threading.Thread] = []  # the threads scoring side by side now
        # source -> drifting, as last written to the store; the MAX_SOURCES seen last, as the monitor's windows: a
        # calling AE title is the caller's to choose, and one forgotten is written again when next seen
        self._shared_drift: OrderedDict[str, bool] = OrderedDict()
        # study -> (its closes in a row whose results the disk refused, when to close it again: time.monotonic)
        self._unwritten: dict[str, tuple[int, float]] = {}

    def run(self, stop: threading.Event) -> None:
        failed_steps = 0  # in a row: e.g. the state folder's disk full, its database read-only or held elsewhere
        while not stop.is_set():
            try:
                busy = self.score_queued(stop)
                busy = self.close_quiet_studies() or busy
                failed_steps = 0
            except StoreClosed as err:  # a stop that outwaited a long scoring: nothing half-recorded
                log.warning("%s; the instances being scored stay queued and are scored at the next start", err)
                return
            except Exception as err:  # the node keeps running; the row stays queued and is tried again
                # with backoff, as the sender's steps: at each poll, a full disk would fill the log with tracebacks
                wait = backoff(failed_steps, STEP_RETRY_MAX_S)
                failed_steps += 1
                log.exception("worker step failed; trying again in %.0f s", wait)
                self.monitor.count_failure(err)  # on /metrics, as an HTTP request's 500 is
                stop.wait(wait)
                continue
            if not busy:
                stop.wait(self.poll_seconds)

    def score_queued(self, stop: threading.Event | None = None) -> bool:
        queued = self.store.unscored()
        for start in range(0, len(queued), self.at_once):
            if stop is not None and stop.is_set():
                break
            group = queued[start : start + self.at_once]
            outcomes = self._side_by_side(group) if len(group) > 1 else map(self._score, group)
            for instance, outcome in zip(group, outcomes):
                self._record(instance, outcome)
        return bool(queued)

    def _side_by_side(self, group: list) -> Iterator[tuple[list[Score] | Rejection, float]]:
        """Each instance's outcome, scored each in a thread of its own; a scoring that raised raises here, once the
        outcomes before it are taken. The threads are daemons, as the worker is: a stop waits for them no longer than
        for the worker (Node.stop), and one still scoring then does not hold the process's exit."""
        outcomes: list = [None] * len(group)

        def score(index: int, instance) -> None:
            try:
                outcomes[index] = self._score(instance)
            except Exception as err:  # noqa: BLE001 -- raised in the worker's thread, which handles a failed step
                outcomes[index] = err

        self._scoring = [
            threading.Thread(target=score, args=(index, instance), name=f"medtriage-scoring-{index}", daemon=True)
            for index, instance in enumerate(group)
        ]
        for thread in self._scoring:
            thread.start()
        for thread in self._scoring:
            thread.join()
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
            yield outcome

    def _score(self, instance) -> tuple[list[Score] | Rejection, float]:
        started = time.perf_counter()
        outcome = self.predictor.score_or_reject(instance.spool, instance.name)
        return outcome, time.perf_counter() - started

    def _record(self, instance, scored: tuple[list[Score] | Rejection, float]) -> None:
        outcome, seconds = scored
        if isinstance(outcome, Rejection):
            log.info("not analysed: %s (%s)", instance.sop_uid, outcome.reason)
            self.store.set_rejected(instance.sop_uid, outcome.reason)
        else:
            self.store.set_scored(instance.sop_uid, [score.as_dict() for score in outcome])
        # Counted once on record: when the write fails the row stays queued and is scored again, and counts then.
        self.monitor.record(outcome, instance.calling_aet, seconds)
        self._share_drift(instance.calling_aet)

    def _share_drift(self, calling_aet: str) -> None:
        """Keep the store's drifting sources as the monitor has them, for a worklist served by another process."""
        if not self.monitor.drift.enabled:
            return
        source = source_name(calling_aet)
        drifting = self.monitor.drift.drifting(source)
        if self._shared_drift.get(source) != drifting:
            self.store.mark_drifting(source, drifting)
        self._shared_drift[source] = drifting
        self._shared_drift.move_to_end(source)
        if len(self._shared_drift) > MAX_SOURCES:
            self._shared_drift.popitem(last=False)

    def close(self, timeout: float | None = None) -> bool:
        """Wait for the scorings in progress, `timeout` seconds at most (None: until they end); whether they ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._scoring:
            thread.join(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
        return not any(thread.is_alive() for thread in self._scoring)

    def close_quiet_studies(self) -> bool:
        self._reopen_unwritten()
        restamped = self.store.restamp_future_arrivals()
        if restamped:
            log.warning("the clock was set back: %d open study(ies) last received later than now count as received now", restamped)
        studies = self.store.quiet_studies(self.study_timeout)
        for study_uid in studies:
            self.close_study(study_uid)
        return bool(studies)

    def _reopen_unwritten(self) -> None:
        """Open again the studies whose results the disk refused, once their wait is over: closed again if quiet."""
        now = time.monotonic()
        for study_uid, (_, due) in list(self._unwritten.items()):
            if due <= now and not self.store.reopen_unwritten(study_uid):
                del self._unwritten[study_uid]  # no longer failed so (a new instance reopened it): closed as any

    def close_study(self, study_uid: str) -> None:
        refused, _ = self._unwritten.pop(study_uid, (0, 0.0))
        seen = time.time()
        rows = self.store.study_instances(study_uid)
        if any(row["state"] == "received" for row in rows):  # arrived since the study was found quiet: not scored yet
            return
        scored = [(row, json.loads(row["result"])) for row in rows if row["state"] == "scored"]
        reasons = [row["reason"] for row in rows if row["state"] == "rejected"]
        covers = {"instances": len(rows)}  # the close is refused if the study holds others by its commit
        if not scored:
            reason = rejection_summary(reasons) or "no instance could be scored"
            self.store.close_study(study_uid, None, reason, None, [], seen, **covers)
            return
        top = min((score for _, scores in scored for score in scores), key=urgency)
        note = f"not analysed: {rejection_summary(reasons)}" if reasons else None
        try:
            deliveries, sr_uid = self.write_results(study_uid, scored, top)
        except StoreClosed:  # the node stopping, not a fault of this study's SR
            raise
        except Exception as err:  # noqa: BLE001 -- recorded on the study; a new instance retries (a refused write: backoff)
            expected = isinstance(err, MedTriageError)
            reason = err.reason if expected else f"{type(err).__name__}: {err}"
            # the disk refused the files (full, say): tried again with backoff, not failed for good as a damaged header
            retry = self._retry_unwritten(study_uid, refused) if isinstance(err, OSError) else ""
            level = logging.WARNING if expected else logging.ERROR  # anything else is a fault: its traceback says where
            log.log(level, "study %s scored, but no SR could be built: %s%s", study_uid, reason, retry, exc_info=not expected)
            if not expected:  # as /v1/sr's 500 for the same fault
                self.monitor.count_failure(err)
            said = f"{UNWRITTEN}: {reason}{retry}" if retry else f"scored, but no SR could be built: {reason}"
            self.store.close_study(study_uid, top, said, None, [], seen, state="failed", **covers)
            return
        try:
            closed = self.store.close_study(study_uid, top, note, sr_uid, deliveries, seen, **covers)
        except CommitUncertain:
            log.error("study %s: its close may or may not be recorded; its result files stay until the node's next start", study_uid)
            raise  # the files stay: removed, a close that did commit would name files that are gone
        except Exception:
            self._discard(deliveries)
            raise
        if not closed:  # an instance arrived meanwhile: the study's next close writes results of its own
            self._discard(deliveries)
            return
        log.info("study %s: %s (p=%.3f) over %d instance(s)", study_uid, top["priority"], top["probability"], len(scored))

    def _retry_unwritten(self, study_uid: str, refused: int) -> str:
        """Schedule the study's next close after the disk refused its results `refused` + 1 times in a row; what the
        study's reason adds."""
        wait = backoff(refused, STEP_RETRY_MAX_S)
        self._unwritten[study_uid] = (refused + 1, time.monotonic() + wait)
        return f"; trying again in {wait:.0f} s"

    def _discard(self, deliveries: list[tuple[str, str, str, str]]) -> None:
        """Remove the outbox files of a close that did not commit, which no delivery row names: each is named by the
        digest of its study and a SOP Instance UID made for this close (generate_uid), never an earlier one's."""
        self._remove({name for _, _, name, _ in deliveries})

    def _remove(self, names) -> None:
        for name in names:
            self.store.outbox_path(name).unlink(missing_ok=True)

    def write_results(self, study_uid: str, scored: list, top: dict) -> tuple[list[tuple[str, str, str, str]], str]:
        """The SR (and heatmap) files in the outbox, and the delivery rows they need. Every object is built before the
        first file is written, and a write that fails removes those before it: a close that raises leaves no file,
        which no delivery would name (as _discard)."""
        sources = [(read_header(self.store.spooled(row["spool"])), [as_score(s) for s in scores]) for row, scores in scored]
        patient = patient_source([header for header, _ in sources])
        sources.sort(key=lambda source: source[0] is not patient)  # the SR copies its patient from its first source
        sr_uid = generate_uid()
        revision = self.store.reports_sent(study_uid) + 1  # a late instance reopens the study: its next report
        with reading(f"the SR of study {study_uid}"):  # its sources' values are converted, and warned of, here
            sr = build_study_sr(sources, self.predictor.package, sop_instance_uid=sr_uid, revision=revision)
        built = [("sr", sr_uid, encoded(sr, "the study's SR", study_uid))]
        if self.heatmaps:
            built += self._heatmap(study_uid, scored, top, revision, patient)
        objects = self._to_outbox(study_uid, built)
        return [(kind, destination, name, uid) for kind, name, uid in objects for destination in self.destinations], sr_uid

    def _heatmap(self, study_uid: str, scored: list, top: dict, revision: int, patient: Dataset) -> list[tuple[str, str, bytes]]:
        from medtriage.serve.node.heatmap import secondary_capture

        row = next(row for row, scores in scored if row["sop_uid"] == top["sop_uid"])
        try:
            image = secondary_capture(self.predictor, self.store.spooled(row["spool"]), as_score(top), revision, patient)
            data = encoded(image, "the heatmap Secondary Capture", top["sop_uid"])
        except MedTriageError as err:  # the SR still goes; the picture is an extra
            log.warning("no heatmap for study %s: %s", study_uid, err)
            return []
        return [("heatmap", image.SOPInstanceUID, data)]

    def _to_outbox(self, study_uid: str, built: list[tuple[str, str, bytes]]) -> list[tuple[str, str, str]]:
        """Each (kind, SOP UID, data) in its outbox file, as (kind, file name, SOP UID); all of them or none."""
        written: list[tuple[str, str, str]] = []
        try:
            for kind, sop_uid, data in built:
                path = self.store.outbox_path(digest_name(study_uid, sop_uid))
                write_atomic(path, data)
                written.append((kind, path.name, sop_uid))
        except BaseException:
            self._remove(name for _, name, _ in written)
            raise
        return written
