"""What every answer of the HTTP service carries on a real loopback server, refusals and internal errors included
(no caching, no content sniffing), and an upload the service cannot store being the service's fault: never a
"malformed body" that names the server's temporary folder."""

from __future__ import annotations

import socket
import tempfile

import pytest

from medtriage.serve.http import create_app
from medtriage.serve.uploads import SPOOL_IN_MEMORY
from tests.serve.test_http_edges import LiveServer

TOKEN = "limits-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BYTES = 4 * SPOOL_IN_MEMORY


def _raw_answer(port: int, request: bytes) -> bytes:
    """The head of the server's answer to bytes sent as they are (a declared length no client library would send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        conn.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n\r\n")[0].lower()


def test_every_answer_forbids_caching_and_content_sniffing(predictor):
    server = LiveServer(create_app(predictor, token=TOKEN, max_bytes=MAX_BYTES))
    with server as client:
        answers = {
            "model": client.get("/v1/model", headers=AUTH),
            "rows": client.get("/v1/worklist", headers=AUTH),
            "no token": client.get("/v1/worklist"),
            "no route": client.get("/v1/../../etc/passwd", headers=AUTH),
            "not dicom": client.post("/v1/score", files=[("files", ("a.png", b"\x89PNG" + bytes(64)))], headers=AUTH),
        }
        too_large = _raw_answer(
            server.port,
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Type: application/dicom\r\nContent-Length: %d\r\n\r\n" % (MAX_BYTES + 1),
        )
    for name, answer in answers.items():
        assert answer.headers.get("x-content-type-options") == "nosniff", name
        assert answer.headers.get("cache-control") == "no-store", name
    assert too_large.startswith(b"http/1.1 413") and b"x-content-type-options: nosniff" in too_large


def test_an_internal_error_is_not_cached_nor_sniffed(predictor, monkeypatch, caplog):
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        monkeypatch.setattr("medtriage.serve.worklist.Worklist.rows", lambda self: 1 / 0)
        response = client.get("/v1/worklist", headers=AUTH)
        monkeypatch.undo()
        after = client.get("/v1/worklist", headers=AUTH)
    assert response.status_code == 500 and "ZeroDivisionError" in response.json()["error"]["reason"]
    assert response.headers.get("cache-control") == "no-store"
    assert response.headers.get("x-content-type-options") == "nosniff"
    assert after.status_code == 200  # the service keeps answering


@pytest.mark.parametrize("form", ["multipart", "raw"])
def test_an_upload_the_service_cannot_store_is_its_own_fault_and_names_no_server_path(predictor, tmp_path, monkeypatch, form):
    gone = tmp_path / "removed-temporary-folder"  # uploads over SPOOL_IN_MEMORY go to disk: here nowhere
    body = b"\0" * (SPOOL_IN_MEMORY + 4096)
    with LiveServer(create_app(predictor, token=TOKEN, max_bytes=MAX_BYTES)) as client:
        monkeypatch.setattr(tempfile, "tempdir", str(gone))
        if form == "multipart":
            response = client.post("/v1/score", files=[("files", ("big.dcm", body))], headers=AUTH)
        else:
            response = client.post("/v1/score", content=body, headers={**AUTH, "Content-Type": "application/dicom"})
        monkeypatch.undo()
    assert response.status_code == 503, response.text[:300]
    error = response.json()["error"]
    assert "could not be stored" in error["reason"] and error["hint"]
    assert str(tmp_path) not in response.text and "tmp" not in error["reason"]
