"""A request that fails for the service's own reasons (here the worklist's database refusing writes) is answered 500
with what failed and what to do, naming no path of the service, and is counted on /metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from medtriage.serve.http import create_app
from medtriage.serve.node.store import NodeStore
from tests.serve.test_http_edges import AUTH, CT, TOKEN, LiveServer


def failed(text: str) -> dict[str, float]:
    samples = (s for family in text_string_to_metric_families(text) for s in family.samples)
    return {s.labels["reason"]: s.value for s in samples if s.name == "medtriage_failed_total"}


def test_a_worklist_that_cannot_record_a_score_is_a_counted_500(predictor, tmp_path):
    store = NodeStore(tmp_path / "state")
    store._db.execute("PRAGMA query_only = ON")  # SQLite refuses every write, as with a read-only database file
    with LiveServer(create_app(predictor, token=TOKEN, state=store)) as client:
        answer = client.post("/v1/score", files=[("files", ("ct.dcm", open(CT, "rb").read()))], headers=AUTH)
        metrics = client.get("/metrics", headers=AUTH).text
    error = answer.json()["error"]
    assert answer.status_code == 500 and error["file"] == "ct.dcm" and "worklist could not record" in error["reason"]
    assert "state folder" in error["hint"] and str(tmp_path) not in answer.text
    assert failed(metrics) == {"worklist_write_error": 1.0}


def test_a_file_the_scorer_fails_on_is_rejected_by_the_error_type_without_its_message(predictor, tmp_path, monkeypatch):
    """Before, the rejection a client got carried the error's message, which may name the service's files."""
    secret = str(tmp_path / "models" / "private" / "model.onnx")

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error", secret)

    monkeypatch.setattr(predictor, "score_decoded", failing)
    for state in (None, NodeStore(tmp_path / "state")):  # the worklist's path, and the plain one
        with LiveServer(create_app(predictor, token=TOKEN, state=state)) as client:
            answer = client.post("/v1/score", files=[("files", ("ct.dcm", open(CT, "rb").read()))], headers=AUTH)
        (rejected,) = answer.json()["rejected"]
        assert "internal error while scoring (OSError)" in rejected["reason"] and secret not in answer.text


def test_a_request_the_scorer_failed_on_is_a_counted_500_not_the_files_fault(predictor, monkeypatch):
    """Before, it was a 422, which tells a sender the file is bad and not to send it again, and only
    medtriage_rejected_total counted it: a scorer failing on every file raised no failure on /metrics."""

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(predictor, "score_decoded", failing)
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        ct = open(CT, "rb").read()
        score = client.post("/v1/score", files=[("files", ("ct.dcm", ct))], headers=AUTH)
        sr = client.post("/v1/sr", files=[("files", ("ct.dcm", ct))], headers=AUTH)
        metrics = client.get("/metrics", headers=AUTH).text
    assert (score.status_code, sr.status_code) == (500, 500), (score.text, sr.text)
    for answer in (score, sr):
        error = answer.json()["error"]
        assert "internal error while scoring (OSError)" in error["reason"] and "retry" in error["hint"]
    assert score.json()["rejected"][0]["file"] == "ct.dcm" and sr.json()["error"]["file"] == "ct.dcm"
    assert failed(metrics) == {"os_error": 2.0}
