"""Stopping the real service while an inference call never returns: uvicorn gives the requests in progress
--stop-timeout seconds, and the process then ends with a line saying what it cut off, status 1. Before, it waited
for ever (uvicorn for the request's connection; after a second Ctrl-C, the interpreter for the worker thread at exit)
until SIGKILL."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.test_serve_http import AUTH, CT, TOKEN, _wait_until_up, files, free_port

ENDED_WITHIN_S = 30  # far above the test's --stop-timeout: not a timing, only "it ended at all"
# The real command, with every ONNX Runtime call held for ever once it has said so (a file named in $HELD_MARKER).
HOLDING_MAIN = """
import os, sys, threading
import onnxruntime
from medtriage.cli import main

def held(*args, **kwargs):
    open(os.environ["HELD_MARKER"], "w").close()
    threading.Event().wait()

onnxruntime.InferenceSession.run = held
sys.exit(main(sys.argv[1:]))
"""


def start_serve(package_dir: Path, *options: str, holding: Path | None = None) -> tuple[subprocess.Popen, httpx.Client]:
    port = free_port()
    program = ["-c", HOLDING_MAIN] if holding else ["-m", "medtriage.cli"]
    command = [sys.executable, *program, "serve", str(package_dir), "--port", str(port), "--threads", "1", "--stop-timeout", "1", *options]
    env = {**os.environ, "MEDTRIAGE_TOKEN": TOKEN, "HELD_MARKER": str(holding)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=ENDED_WITHIN_S)
    try:
        _wait_until_up(client, process)
    except BaseException:
        process.kill()
        raise
    return process, client


def stopped(process: subprocess.Popen, signum: int) -> str:
    """`signum` to the service; its output once it has ended (within ENDED_WITHIN_S, else the test fails)."""
    process.send_signal(signum)
    try:
        return process.communicate(timeout=ENDED_WITHIN_S)[0]
    finally:
        process.kill()


def post_in_background(client: httpx.Client) -> None:
    def post():
        try:
            client.post("/v1/score", files=files(CT), headers=AUTH)
        except httpx.HTTPError:
            pass  # cut off: what it gets, if anything, is not the point

    threading.Thread(target=post, daemon=True).start()


def wait_for_file(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + ENDED_WITHIN_S
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the inference call did not start"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("signum", "options"), [(signal.SIGTERM, []), (signal.SIGINT, ["--max-batch", "2"])], ids=["sigterm", "ctrl-c-batching"]
)
def test_a_stop_with_an_inference_call_that_never_returns_ends_with_one_line_and_status_1(package_dir, tmp_path, signum, options):
    marker = tmp_path / "held"
    process, client = start_serve(package_dir, *options, holding=marker)
    try:
        post_in_background(client)
        wait_for_file(marker, process)
        output = stopped(process, signum)
    finally:
        client.close()
    assert process.returncode == 1, output
    (line,) = [line for line in output.splitlines() if "still running" in line]
    assert line.startswith("error: ") and "1 inference call(s) still running" in line and "cut off" in line, output
    assert "Traceback" not in output and "a request in progress was cut off by the stop" in output, output


def test_a_stop_with_nothing_running_ends_with_status_0(package_dir):
    """After a request answered (its worker thread idle), the check for calls left running finds none. SIGTERM ends
    it as Ctrl-C does, with status 0 (before, the signal's default action ended it once uvicorn had stopped)."""
    process, client = start_serve(package_dir)
    try:
        assert client.post("/v1/score", files=files(CT), headers=AUTH).status_code == 200
        output = stopped(process, signal.SIGTERM)
    finally:
        client.close()
    assert process.returncode == 0, output
    assert "still running" not in output and "Traceback" not in output and "Finished server process" in output, output
