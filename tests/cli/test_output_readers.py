"""Commands whose output is piped into a reader that stops early (`medtriage ... | head -1`) or kept in a log file.

Before, the first print after the reader left ended the command with a BrokenPipeError traceback, and whatever it
still had to write after its output (an audit's --json) was never written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NPZ = ROOT / "data" / "samples" / "pneumoniamnist_28.npz"


def run_into_a_closed_pipe(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`medtriage ARGV | true`: the reader is gone before the command writes its first line."""
    command = [sys.executable, "-m", "medtriage.cli", *argv]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd) as process:
        process.stdout.close()
        err = process.stderr.read().decode()
        code = process.wait(timeout=120)
    return subprocess.CompletedProcess(command, code, "", err)


def test_make_sites_into_a_pipe_whose_reader_left_finishes_quietly(tmp_path):
    done = run_into_a_closed_pipe(["make-sites", "--npz", str(NPZ), "--out", str(tmp_path / "sites"), "--limit", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "sites").iterdir() if not p.name.startswith(".")) == ["northgate", "riverside", "st_marys"]


def test_audit_into_a_pipe_whose_reader_left_still_writes_its_json(two_site_pool, tmp_path):
    report = tmp_path / "audit.json"
    done = run_into_a_closed_pipe(["audit", str(two_site_pool.pool_dir), "--no-images", "--json", str(report)], tmp_path)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode in (0, 1)  # the audit's own verdict
    assert report.is_file()


def test_an_error_message_into_a_closed_stderr_is_no_traceback(tmp_path):
    command = [sys.executable, "-m", "medtriage.cli", "audit", str(tmp_path / "no_pool")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path) as process:
        process.stderr.close()
        out = process.stdout.read().decode()
        code = process.wait(timeout=120)
    assert code == 2 and out == ""


def test_ctrl_c_ends_a_command_with_a_message_and_status_130_not_a_traceback(capsys):
    from medtriage.cli import report_errors

    def interrupted():
        raise KeyboardInterrupt

    try:
        code = report_errors(interrupted)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt went on, to end the command with a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert err.startswith("stopped (Ctrl-C") and "may be incomplete" in err


def test_ctrl_c_of_a_real_command_prints_no_traceback(tmp_path):
    import signal
    import time

    command = [sys.executable, "-m", "medtriage.cli", "make-sites", "--npz", str(NPZ), "--out", str(tmp_path / "sites")]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path) as process:
        deadline = time.monotonic() + 60
        while not (tmp_path / "sites").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the command is at work: its output folder is there
        process.send_signal(signal.SIGINT)
        err = process.stderr.read().decode()
        code = process.wait(timeout=60)
    assert "Traceback" not in err, err
    assert code in (0, 130), err  # 0: it finished before the signal came
