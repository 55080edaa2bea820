"""The HTTP service on a real loopback server (uvicorn in a thread, so the store can be instrumented): worklist ids
that are not row numbers, errors on unknown routes, two instances of one study scored at once, and how much of a
waiting multipart upload is held in memory."""

from __future__ import annotations

import io
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pydicom
import pytest
import uvicorn
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtriage.serve.admission import Admission
from medtriage.serve.http import create_app
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import urgency
from medtriage.serve.uploads import SPOOL_IN_MEMORY
from tests.serve.node.peers import free_port

TOKEN = "edge-token-93d1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CT = get_testdata_file("CT_small.dcm")


class LiveServer:
    """`create_app(...)` served by uvicorn on a free loopback port in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _all_left(admission: Admission, within_s: float = 5.0) -> bool:
    """Whether every request has left `admission`: a request leaves just after its answer is sent."""
    deadline = time.monotonic() + within_s
    while admission.in_system and time.monotonic() < deadline:
        time.sleep(0.01)
    return admission.in_system == 0


def _ct(study_uid: str | None = None, scale: float = 1.0) -> bytes:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    if study_uid:
        ds.StudyInstanceUID = study_uid
    pixels = ds.pixel_array.astype(np.float64) * scale
    ds.PixelData = np.clip(pixels, -32768, 32767).astype(ds.pixel_array.dtype).tobytes()
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_a_worklist_id_that_is_no_row_number_is_404_not_500(predictor):
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        for entry in ("99999999999999999999999", "9" * 5000, "%C2%B2", "٣"):  # past SQLite's integers, past int(), non-ASCII digits
            for suffix in ("", "/overlay.png"):
                response = client.get(f"/v1/worklist/{entry}{suffix}", headers=AUTH)
                assert response.status_code == 404, (entry[:30], suffix, response.text[:200])
                assert "no worklist entry" in response.json()["error"]["reason"]


def test_an_unknown_route_or_method_says_where_and_what_to_do(predictor):
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        missing = client.get("/v1/scores", headers=AUTH)
        assert missing.status_code == 404 and "/v1/scores" in missing.json()["error"]["reason"]
        assert "/docs" in missing.json()["error"]["hint"]
        wrong = client.get("/v1/score", headers=AUTH)
        assert wrong.status_code == 405 and "GET /v1/score" in wrong.json()["error"]["reason"]
        assert wrong.headers["allow"] == "POST" and "POST" in wrong.json()["error"]["hint"]  # RFC 9110: a 405 names what is allowed


class RacingStore(NodeStore):
    """Forces one interleaving of two uploads of one study: A reads the study's instances, B records its instance, A
    closes the study, then B reads and closes."""

    def __init__(self, first_sop: str, second_sop: str):
        super().__init__(None)
        self.first_sop, self.second_sop = first_sop, second_sop
        self.first_read, self.second_recorded, self.first_closed = threading.Event(), threading.Event(), threading.Event()
        self.reader = threading.local()

    def record_instance(self, sop_uid, *args, **kwargs):
        self.reader.sop = sop_uid
        if sop_uid == self.second_sop:
            self.first_read.wait(5)
        recorded = super().record_instance(sop_uid, *args, **kwargs)
        if sop_uid == self.second_sop:
            self.second_recorded.set()
        return recorded

    def study_instances(self, study_uid):
        if getattr(self.reader, "sop", None) == self.second_sop:
            self.first_closed.wait(5)
        rows = super().study_instances(study_uid)
        if getattr(self.reader, "sop", None) == self.first_sop:
            self.first_read.set()
            self.second_recorded.wait(5)
        return rows

    def close_study(self, study_uid, *args, **kwargs):
        closed = super().close_study(study_uid, *args, **kwargs)
        if getattr(self.reader, "sop", None) == self.first_sop:
            self.first_closed.set()
        return closed


def test_two_instances_of_one_study_scored_at_once_show_the_more_urgent(predictor):
    study = generate_uid()
    files = [_ct(study, scale) for scale in (1.0, 0.0)]
    scores = [predictor.score_or_reject(data, f"{i}.dcm")[0].as_dict() for i, data in enumerate(files)]
    assert scores[0]["probability"] != scores[1]["probability"]  # the two images must score differently
    quiet, urgent = sorted(range(2), key=lambda i: urgency(scores[i]), reverse=True)
    sops = [pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for data in files]
    store = RacingStore(first_sop=sops[quiet], second_sop=sops[urgent])
    app = create_app(predictor, token=TOKEN, state=store, admission=Admission(workers=2))
    with LiveServer(app) as client, ThreadPoolExecutor(2) as pool:
        post = [
            pool.submit(client.post, "/v1/score", content=files[i], headers={**AUTH, "Content-Type": "application/dicom"})
            for i in (quiet, urgent)
        ]
        assert [p.result().status_code for p in post] == [200, 200]
        rows = client.get("/v1/worklist", headers=AUTH).json()["entries"]
    assert len(rows) == 1 and rows[0]["instances"] == 2
    assert rows[0]["probability"] == pytest.approx(scores[urgent]["probability"])  # not the first instance's score


def test_a_waiting_multipart_upload_of_many_small_files_is_not_held_in_memory(predictor, monkeypatch):
    held: list[int] = []
    score = predictor.score_decoded

    def score_and_measure(*args, **kwargs):  # runs once the request has streamed all its files and won a slot
        if not held:
            import gc

            held.append(
                sum(
                    f._file.tell() if hasattr(f._file, "getvalue") else 0
                    for f in gc.get_objects()
                    if isinstance(f, tempfile.SpooledTemporaryFile) and not f._rolled
                )
            )
        return score(*args, **kwargs)

    monkeypatch.setattr(predictor, "score_decoded", score_and_measure)
    data = _ct()
    count = 4 * SPOOL_IN_MEMORY // len(data) + 1  # ~4 MB of small files, each far under the per-file spool size
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        response = client.post("/v1/score", files=[("files", (f"{i}.dcm", data, "application/dicom")) for i in range(count)], headers=AUTH)
    assert response.status_code == 200 and len(response.json()["results"]) == count
    assert held and held[0] <= 2 * SPOOL_IN_MEMORY, f"{held[0]} bytes of the upload held in memory"


def _score_head(data: bytes) -> bytes:
    """The head of a raw `POST /v1/score` of `data`, for a client that then sends the body its own way."""
    head = f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    return (head + f"Content-Type: application/dicom\r\nContent-Length: {len(data)}\r\n\r\n").encode()


def _rest_of_answer(connection: socket.socket, answer: bytes) -> str:
    connection.settimeout(10)
    while not answer.endswith(b"}") and (more := connection.recv(4096)):  # the JSON body may come in a second packet
        answer += more
    return answer.decode(errors="replace")


def _assert_dropped_and_place_freed(client, admission: Admission, data: bytes, answer: str, waited: float, why: str) -> None:
    """The slow upload got a 408 saying `why` within 10 s, and the next upload is scored in the place it held."""
    assert answer.startswith("HTTP/1.1 408") and why in answer, answer[:300]
    assert waited < 10
    after = client.post("/v1/score", content=data, headers={**AUTH, "Content-Type": "application/dicom"})
    assert after.status_code == 200 and _all_left(admission)


def test_an_upload_that_stops_sending_is_dropped_and_frees_its_place(predictor, monkeypatch):
    """A client that dies mid-body without closing its connection (no FIN) would wait for its body for good, holding
    a place in the admission queue; after BODY_IDLE_S without a byte it gets a 408 and its place is free again."""
    from medtriage.serve import uploads

    monkeypatch.setattr(uploads, "BODY_IDLE_S", 1.0)
    admission = Admission(workers=1, queue=0)
    with LiveServer(create_app(predictor, token=TOKEN, admission=admission)) as client:
        data = _ct()
        with socket.create_connection(("127.0.0.1", client.base_url.port), timeout=10) as stalled:
            stalled.sendall(_score_head(data) + data[:1000])  # then nothing more
            started = time.monotonic()
            first = stalled.recv(4096)
            waited = time.monotonic() - started
            answer = _rest_of_answer(stalled, first)
        _assert_dropped_and_place_freed(client, admission, data, answer, waited, "no request body bytes for 1 s")


def test_an_upload_that_trickles_is_dropped_and_frees_its_place(predictor, monkeypatch):
    """A client sending a few bytes every second never pauses long enough for the idle timeout, yet would hold its
    place for hours: after the grace period the body must average BODY_MIN_RATE."""
    from medtriage.serve import uploads

    monkeypatch.setattr(uploads, "BODY_GRACE_S", 1.0)
    monkeypatch.setattr(uploads, "BODY_MIN_RATE", 1000)
    admission = Admission(workers=1, queue=0)
    with LiveServer(create_app(predictor, token=TOKEN, admission=admission)) as client:
        data = _ct()
        with socket.create_connection(("127.0.0.1", client.base_url.port), timeout=10) as trickling:
            trickling.sendall(_score_head(data))
            trickling.settimeout(0.2)
            first, sent, started = b"", 0, time.monotonic()
            while not first and time.monotonic() - started < 15:
                trickling.sendall(data[sent : sent + 50])  # 250 bytes/s: never idle, far below the minimum
                sent += 50
                try:
                    first = trickling.recv(4096)
                except TimeoutError:
                    pass
            waited = time.monotonic() - started
            answer = _rest_of_answer(trickling, first)
        _assert_dropped_and_place_freed(client, admission, data, answer, waited, "arrived too slowly")
