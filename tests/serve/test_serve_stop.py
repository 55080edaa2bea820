"""Stopping the real service from its terminal: Ctrl-C lets uvicorn answer what it holds and shut down, and the command
ends with status 0, not with the message of a command cut short (report_errors' KeyboardInterrupt answer)."""

import os
import signal
import subprocess
import sys

import httpx

from tests.serve.test_serve_http import _wait_until_up, free_port


def test_ctrl_c_stops_the_service_with_one_line_and_no_traceback(package_dir):
    port = free_port()
    command = [sys.executable, "-m", "medtriage.cli", "serve", str(package_dir), "--port", str(port), "--threads", "1"]
    env = {**os.environ, "MEDTRIAGE_TOKEN": "stop-test-token"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_until_up(client, process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "may be incomplete" not in output, output
    assert "Finished server process" in output, output
