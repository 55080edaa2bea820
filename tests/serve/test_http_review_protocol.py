"""Requests the HTTP/1.1 parser refuses before any route runs, on the service's own connection protocol: they are
answered as every other refusal is (a JSON body that says what to do, never cached nor sniffed), and garbage sent
after an answer ends the connection without a traceback in the service's log. Also: the worklist page reached with a
slash after its path, as a browser without the token asks for it."""

from __future__ import annotations

import json
import logging
import socket
import time

from medtriage.serve.admission import Admission
from medtriage.serve.http import create_app
from tests.serve.test_http_edges import TOKEN, LiveServer, _all_left
from tests.serve.test_http_slow_clients import DeadlineServer

CHUNKED_UPLOAD = b"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/dicom\r\nTransfer-Encoding: chunked\r\n"


def _exchange(port: int, *parts: bytes, pause_s: float = 0.2) -> bytes:
    """Send `parts` with a pause between them; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        for part in parts:
            try:
                conn.sendall(part)
            except OSError:
                break  # closed already: its answer is read below
            time.sleep(pause_s)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def _refusal(answer: bytes) -> tuple[str, dict]:
    """The head (lower case) and the JSON body of one answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.decode("latin-1").lower(), json.loads(body)


def test_a_malformed_request_head_is_a_json_refusal_that_is_not_cached(predictor):
    """Before, uvicorn's own text/plain "Invalid HTTP request received.": no reason, no hint, no no-store."""
    with DeadlineServer(create_app(predictor)) as client:
        answer = _exchange(client.base_url.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nBad Header: y\r\n\r\n")
        head, body = _refusal(answer)
        assert head.startswith("http/1.1 400 ") and "content-type: application/json" in head, answer
        assert "cache-control: no-store" in head and "x-content-type-options: nosniff" in head
        assert "malformed http/1.1 request" in body["error"]["reason"].lower() and body["error"]["hint"]
        assert client.get("/health").status_code == 200


def test_a_malformed_chunked_upload_is_a_json_refusal_and_gives_its_place_back(predictor):
    admission = Admission(workers=1, queue=1)
    with DeadlineServer(create_app(predictor, token=TOKEN, admission=admission)) as client:
        auth = f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        answer = _exchange(client.base_url.port, CHUNKED_UPLOAD + auth, b"ZZ\r\nnot a chunk size\r\n0\r\n\r\n")
        head, body = _refusal(answer)
        assert head.startswith("http/1.1 400 ") and "cache-control: no-store" in head, answer
        assert body["error"]["hint"]
        assert _all_left(admission)


def test_garbage_after_a_refusal_ends_the_connection_without_a_traceback(predictor, caplog):
    """A client refused (here 401) that sends on a broken chunked body: before, h11 refused uvicorn's second answer and
    asyncio logged "Fatal error: protocol.data_received() call failed" with a traceback, for any client to cause."""
    with DeadlineServer(create_app(predictor, token=TOKEN)) as client:
        with caplog.at_level(logging.WARNING):
            answer = _exchange(client.base_url.port, CHUNKED_UPLOAD + b"\r\n", b"ZZ\r\nnot a chunk size\r\n0\r\n\r\n")
            time.sleep(0.2)  # the server has handled the garbage and closed
        assert answer.startswith(b"HTTP/1.1 401 ") and answer.count(b"HTTP/1.1 ") == 1
        assert not [r for r in caplog.records if r.exc_info or "Fatal error" in r.getMessage()], caplog.text
        assert client.get("/health").status_code == 200


def test_the_page_with_a_slash_after_it_is_reached_without_the_token(predictor):
    """Before, `/worklist/` answered 401 to a browser without the token: the page where it enters one looked broken."""
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        redirect = client.get("/worklist/")
        assert redirect.status_code == 307 and redirect.headers["location"].endswith("/worklist")
        assert client.get("/worklist/", follow_redirects=True).text.startswith("<!doctype html>")
        for closed in ("/v1/worklist/", "/metrics/", "/v1/model/", "/v1/worklist//"):  # the data stays closed
            assert client.get(closed).status_code == 401, closed
