"""Serving edges: clients that hang up while their images are scored or queued (a real loopback server and raw
sockets), one app served on more than one event loop, and operating-point thresholds met by float32 probabilities
that round across them."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import httpx
import numpy as np

from medtriage.evaluation.operating_points import choose_priority_thresholds
from medtriage.format import META_FILE
from medtriage.serve.admission import Admission
from medtriage.serve.http import create_app
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.serve.test_http_edges import AUTH, CT, TOKEN, LiveServer, _all_left, _ct, _score_head

DICOM = {**AUTH, "Content-Type": "application/dicom"}


class CountingAdmission(Admission):
    """Admission that counts the requests that asked for a working slot (their bodies fully read)."""

    def __init__(self, workers: int, queue: int):
        super().__init__(workers, queue)
        self.asked = 0

    @asynccontextmanager
    async def slot(self):
        self.asked += 1
        async with super().slot():
            yield


class GatedScoring:
    """`predictor.score_decoded` held at a gate: records each image it starts on, then waits for `release`."""

    def __init__(self, predictor, monkeypatch):
        self.score, self.started, self.release = predictor.score_decoded, [], threading.Event()
        monkeypatch.setattr(predictor, "score_decoded", self)

    def __call__(self, image, name):
        self.started.append(name)
        self.release.wait(30)
        return self.score(image, name)


def _until(condition, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _hang_up_while_scoring(live: LiveServer, admission: CountingAdmission, gate: GatedScoring, clients: int) -> None:
    """`clients` raw connections each POST a whole image and hang up once the first is being scored and the
    others wait for a slot; returns when the server has seen every connection close."""
    data = _ct()
    connections = [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(clients)]
    for connection in connections:
        connection.sendall(_score_head(data) + data)
    assert _until(lambda: gate.started and admission.asked == clients), "the requests never reached their slots"
    for connection in connections:
        connection.close()
    assert _until(lambda: not live.server.server_state.connections), "the server did not see the clients go"


def test_a_client_that_hangs_up_mid_scoring_frees_its_place_when_the_scoring_ends(predictor, monkeypatch):
    gate = GatedScoring(predictor, monkeypatch)
    admission = CountingAdmission(workers=1, queue=0)
    live = LiveServer(create_app(predictor, token=TOKEN, admission=admission))
    with live as client:
        _hang_up_while_scoring(live, admission, gate, clients=1)
        gate.release.set()
        assert _all_left(admission)
        after = client.post("/v1/score", content=_ct(), headers=DICOM)
    assert after.status_code == 200 and admission.in_system == 0 and admission.refused == 0


def test_queued_work_of_clients_that_hung_up_is_dropped_not_scored(predictor, monkeypatch):
    gate = GatedScoring(predictor, monkeypatch)
    clients = 3
    admission = CountingAdmission(workers=1, queue=clients - 1)
    live = LiveServer(create_app(predictor, token=TOKEN, admission=admission))
    with live as client:
        _hang_up_while_scoring(live, admission, gate, clients)
        gate.release.set()
        assert _all_left(admission)
        assert len(gate.started) == 1, f"{len(gate.started)} images scored for clients that had gone"
        after = [client.post("/v1/score", content=_ct(), headers=DICOM) for _ in range(2)]
    assert [a.status_code for a in after] == [200, 200] and admission.in_system == 0 and admission.refused == 0


def _post_score(port: int) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/score", content=_ct(), headers=DICOM, timeout=30)


def test_one_app_served_on_a_new_event_loop_still_queues_for_its_working_slot(predictor, monkeypatch):
    """Before, the working slots were an asyncio.Semaphore bound to the first loop a request waited on: served again
    (a restarted server, each test's own), a request that had to wait for a slot failed with a 500."""
    gate = GatedScoring(predictor, monkeypatch)
    admission = CountingAdmission(workers=1, queue=1)
    app = create_app(predictor, token=TOKEN, admission=admission)
    for server in range(2):  # each LiveServer runs its own event loop
        gate.started.clear()
        gate.release.clear()
        admission.asked = 0
        live = LiveServer(app)
        with live, ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post_score, live.port)
            assert _until(lambda: gate.started), "the first request was never scored"
            second = pool.submit(_post_score, live.port)  # waits for the slot the first holds
            assert _until(lambda: admission.asked == 2), "the second request never asked for a slot"
            gate.release.set()
            answers = [first.result(timeout=60), second.result(timeout=60)]
        assert [a.status_code for a in answers] == [200, 200], (server, answers[1].text)
    assert admission.in_system == 0 and admission.refused == 0


def test_working_slots_bound_the_process_across_event_loops_running_at_once():
    """Two loops (two servers of one app, each in its thread) share the app's slots: no more work at once than that."""
    admission, lock = Admission(workers=1, queue=0), threading.Lock()
    inside, most = [0], [0]

    async def work():
        async with admission.slot():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            await asyncio.sleep(0.001)  # another task of this loop, or the other loop's thread, may try meanwhile
            with lock:
                inside[0] -= 1

    async def many():
        await asyncio.gather(*(work() for _ in range(50)))

    with ThreadPoolExecutor(2) as pool:
        for run in [pool.submit(asyncio.run, many()) for _ in range(2)]:
            run.result(timeout=60)
    assert most == [1] and inside == [0]


def _served_with(package_dir, thresholds: dict) -> Predictor:
    """A predictor over `package_dir` with the thresholds block `thresholds` in its model.json."""
    meta = json.loads((package_dir / META_FILE).read_text())
    meta["thresholds"] = thresholds
    (package_dir / META_FILE).write_text(json.dumps(meta))
    return Predictor(load_package(package_dir), threads=1)


def _validation_priority(score: float, thresholds: dict) -> str:
    """The priority validation gave `score`: `score >= threshold` on float64 scores, as the thresholds were chosen."""
    urgent = thresholds["urgent"]
    if urgent and score >= urgent["threshold"]:
        return "URGENT"
    return "review" if score >= thresholds["review"]["threshold"] else "routine"


def _float32_probabilities(score: float, predictor: Predictor) -> np.ndarray:
    """What ONNX Runtime serves for an image of positive-class probability `score`: float32 probabilities."""
    classes = len(predictor.package.label_names)
    probs = np.full(classes, (1.0 - score) / (classes - 1))
    probs[predictor.positive] = score
    return probs.astype(np.float32)


def test_served_float32_probabilities_keep_the_validation_decisions_at_the_thresholds(package_copy):
    at_review, at_urgent = 0.7, 0.9  # validation scores the thresholds fall on; as float32 each rounds below itself
    scores = np.array([0.1, 0.3, 0.6, at_review, at_review + 1e-9, 0.8, at_urgent, at_urgent + 1e-9, 0.95])
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 1, 1])
    thresholds = choose_priority_thresholds(scores, labels, "sensitivity", 1.0, "specificity", 1.0)
    assert (thresholds["review"]["threshold"], thresholds["urgent"]["threshold"]) == (at_review, at_urgent)
    assert all(float(np.float32(s)) < t <= s for s, t in [(at_review + 1e-9, at_review), (at_urgent + 1e-9, at_urgent)])
    predictor = _served_with(package_copy, thresholds)
    for score in scores:
        probs = _float32_probabilities(score, predictor)
        expected = _validation_priority(score, thresholds)
        assert predictor.priority(float(probs[predictor.positive])) == expected, f"validation score {score!r}"
        assert (predictor.finding(probs) == predictor.package.positive_label) == (expected != "routine"), f"validation score {score!r}"


def test_an_image_whose_validation_score_is_the_threshold_is_served_at_or_above_it(package_copy, predictor):
    """Through ONNX Runtime: an image served the float32 probability p, whose float64 validation score was the
    review threshold just above p (float32 cannot tell them apart), keeps the priority validation gave it."""
    (served,) = predictor.score_file(CT)
    p = np.float32(served.probability)
    threshold = float(p) + float(np.spacing(p)) / 4  # rounds to p in float32
    assert np.float32(threshold) == p and float(p) < threshold
    scores, labels = np.array([float(p) / 2, threshold, (threshold + 1) / 2]), np.array([0, 1, 1])
    thresholds = choose_priority_thresholds(scores, labels, "sensitivity", 1.0)
    assert thresholds["review"]["threshold"] == threshold
    (score,) = _served_with(package_copy, thresholds).score_file(CT)
    assert score.probability == float(p)
    assert (score.priority, score.finding) == ("review", predictor.package.positive_label)
    assert score.decision.startswith("at or above review threshold")
