"""Clients that hold the service's connections or files: a request head sent a byte at a time (slowloris) is
closed with a 408 once its deadline passes, a connection past the limit is answered 503 at once, and a multipart body of more file parts than a route takes is refused
before they are all spooled to temporary files."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from medtriage.serve.http import connection_protocol, create_app
from tests.serve.test_http_edges import LiveServer, free_port

HEADER_TIMEOUT_S = 0.5
HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


class DeadlineServer(LiveServer):
    """LiveServer with the service's connection protocol and a short header deadline."""

    def __init__(self, app, max_connections: int = 64):
        self.port = free_port()
        http = connection_protocol(HEADER_TIMEOUT_S, max_connections)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def _trickle_head(port: int, give_up_s: float) -> tuple[bytes, float]:
    """Send a request head a header line at a time, never ending it; the server's answer and when it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=give_up_s) as conn:
        started = time.monotonic()
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        conn.setblocking(False)
        answer = b""
        while time.monotonic() - started < give_up_s:
            try:
                conn.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break  # the server has closed the connection
            time.sleep(0.05)
            try:
                chunk = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    return answer, time.monotonic() - started


def test_a_request_head_that_never_ends_is_closed_with_408(predictor):
    with DeadlineServer(create_app(predictor)) as client:
        answer, closed_after = _trickle_head(client.base_url.port, give_up_s=2.0)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request head did not arrive in time" in answer
        assert closed_after >= HEADER_TIMEOUT_S and b"x-content-type-options: nosniff" in answer
        assert client.get("/health").status_code == 200  # whole heads are answered as before


def test_the_deadline_restarts_for_each_request_of_a_kept_alive_connection(predictor):
    with DeadlineServer(create_app(predictor)) as client:
        with socket.create_connection(("127.0.0.1", client.base_url.port), timeout=2) as conn:
            for _ in range(3):  # together longer than one deadline
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                answer = b""
                while not answer.endswith(b'{"status":"ok"}'):  # head and body may come apart
                    chunk = conn.recv(4096)
                    assert chunk, f"the server closed a kept-alive connection after {answer!r}"
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 ")
                time.sleep(HEADER_TIMEOUT_S * 0.6)


def _read_until_closed(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(4096):
        answer += chunk
    return answer


def test_a_connection_past_the_limit_is_answered_503_at_once_and_closed(predictor):
    with DeadlineServer(create_app(predictor), max_connections=2) as client:
        port = client.base_url.port
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]  # silent, within the deadline
        time.sleep(0.1)  # both accepted by the server
        with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT_S / 2) as extra:  # before any deadline
            answer = _read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer and b"as many connections" in answer
        for conn in held:  # the connections within the limit are served as before
            with conn:
                conn.sendall(HEALTH)
                assert _read_until_closed(conn).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:  # and their places are free again
            conn.sendall(HEALTH)
            assert _read_until_closed(conn).startswith(b"HTTP/1.1 200 ")


def test_more_file_parts_than_the_limit_are_refused_by_name(predictor):
    files = [("files", (f"{i}.dcm", b"x")) for i in range(4)]
    with DeadlineServer(create_app(predictor, max_files=3)) as client:
        refused = client.post("/v1/score", files=files)
        assert refused.status_code == 413
        assert refused.json()["error"]["reason"] == "more than 3 files in one request"
        assert "at most 3 files" in refused.json()["error"]["hint"]
        sr = client.post("/v1/sr", files=files[:2])
        assert sr.status_code == 400 and "exactly one file" in sr.json()["error"]["reason"]
