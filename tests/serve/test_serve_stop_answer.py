"""What a client gets when a stop cuts its request off (--stop-timeout): the service's JSON error with 503 and
Retry-After, saying the service is stopping, so that a sender retries later or elsewhere. Before, a client still
connected got uvicorn's plain-text "500 Internal Server Error", which reads as a fault of the service or its input."""

import signal
import socket
import threading
from pathlib import Path

import httpx
import pytest

from tests.serve.test_serve_http import AUTH, CT, TOKEN, assert_json_error, files
from tests.serve.test_serve_stop_bound import ENDED_WITHIN_S, start_serve, stopped, wait_for_file

CUT_OFF_LINE = "a request in progress was cut off by the stop"


@pytest.mark.parametrize(
    ("signum", "options"), [(signal.SIGTERM, []), (signal.SIGINT, ["--max-batch", "2"])], ids=["sigterm", "ctrl-c-batching"]
)
def test_a_client_still_waiting_when_the_stop_cuts_its_request_off_gets_a_503_json_error(package_dir, tmp_path, signum, options):
    marker = tmp_path / "held"
    process, client = start_serve(package_dir, *options, holding=marker)
    answers: list = []

    def post():
        try:
            answers.append(client.post("/v1/score", files=files(CT), headers=AUTH))
        except httpx.HTTPError as err:
            answers.append(err)

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    try:
        wait_for_file(marker, process)
        output = stopped(process, signum)
        poster.join(ENDED_WITHIN_S)
    finally:
        client.close()
    assert process.returncode == 1, output
    (answer,) = answers
    assert isinstance(answer, httpx.Response), f"{answer!r}\n{output}"
    assert_json_error(answer, 503)
    error = answer.json()["error"]
    assert "stopping" in error["reason"] and error["hint"], error
    assert answer.headers["retry-after"].isdigit() and answer.headers["connection"] == "close", answer.headers
    assert answer.headers["cache-control"] == "no-store", answer.headers  # as every answer of the service
    assert CUT_OFF_LINE in output and "Traceback" not in output, output


def test_a_request_whose_client_hung_up_is_cut_off_quietly(package_dir, tmp_path):
    """Its answer has nowhere to go: the stop logs the one line of any request it cuts off, and nothing else."""
    marker = tmp_path / "held"
    process, client = start_serve(package_dir, holding=marker)
    client.close()
    body = Path(CT).read_bytes()
    head = f"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
    head += f"Content-Type: application/dicom\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((client.base_url.host, client.base_url.port), timeout=ENDED_WITHIN_S) as hanging_up:
        hanging_up.sendall(head.encode() + body)
        wait_for_file(marker, process)
    output = stopped(process, signal.SIGTERM)
    assert process.returncode == 1, output
    assert output.count(CUT_OFF_LINE) == 1 and "Traceback" not in output and "unexpected error" not in output, output
