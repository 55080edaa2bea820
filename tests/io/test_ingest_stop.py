"""An ingest stopped by a signal (Ctrl-C to the terminal's process group, SIGTERM to the command or to its whole group, as
systemd sends it): the files the workers have in hand are finished and recorded, none of the others handed out is begun,
and the next run takes up the rest, ending with the pool and lists of an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_ledger import INDEX_FILE, ledger_folder
from medtriage.io.site_folder import read_site_folder
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site
from tests.io.test_ingest_faults import SECRET, _rows, _tree

# The `medtriage ingest` command, each file's processing logged as it begins (and the process it begins in) and held
# until the test says go.
GATED_INGEST = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import medtriage.io.ingest_file as ingest_file
    from medtriage.cli import main

    # Ctrl-C heeded, as by a command started from a terminal: the tests may run in the background, which ignores it
    signal.signal(signal.SIGINT, signal.default_int_handler)

    begun, go, real = Path(sys.argv[1]), Path(sys.argv[2]), ingest_file._process_file

    def gated(source, w):
        with open(begun, "a") as log:
            log.write(source + "\\n")
        with open(begun.with_suffix(".pids"), "a") as log:
            log.write(f"{os.getpid()}\\n")
        while not go.exists():
            time.sleep(0.01)
        return real(source, w)

    ingest_file._process_file = gated
    sys.exit(main(sys.argv[3:]))
""")


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never came: {what}"
        time.sleep(0.02)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _gated_ingest(tmp_path: Path, workers: int) -> list[str]:
    """The gated command ingesting `tmp_path/site` (built) into `tmp_path/pool` with `workers` worker processes."""
    site, key_file = tmp_path / "site", tmp_path / "site.key"
    build_phi_site(site)
    key_file.write_text(SECRET.decode() + "\n")
    key_file.chmod(0o600)
    command = [sys.executable, "-c", GATED_INGEST, str(tmp_path / "begun"), str(tmp_path / "go"), "ingest", str(site)]
    command += ["--site", "site_a", "--into", str(tmp_path / "pool"), "--quarantine", str(tmp_path / "q")]
    return command + ["--secret-file", str(key_file), "--workers", str(workers)]


def _ended(pid: int) -> bool:
    """Gone, or a zombie its new parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.parametrize(
    "signum, to_group, workers",
    [(signal.SIGINT, True, 2), (signal.SIGTERM, False, 2), (signal.SIGTERM, True, 2), (signal.SIGINT, True, 1)],
    ids=["ctrl-c", "sigterm", "sigterm-to-group", "ctrl-c-one-process"],
)
def test_a_stopped_ingest_finishes_the_files_in_hand_begins_no_other_and_the_next_run_takes_up_the_rest(
    tmp_path, signum, to_group, workers
):
    site, pool, quarantine, key = tmp_path / "site", tmp_path / "pool", tmp_path / "q", SiteKey(SECRET)
    command = _gated_ingest(tmp_path, workers)
    ingest_site("site_a", site, tmp_path / "whole", key=key, quarantine=tmp_path / "q-whole", progress=False)
    inputs = [str(p) for p in read_site_folder(site).inputs]
    begun, go, stderr = tmp_path / "begun", tmp_path / "go", tmp_path / "stderr"
    with open(stderr, "w") as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        _wait_for(lambda: len(_lines(begun)) == workers or child.poll() is not None, "a file in each worker's hand")
        assert child.poll() is None, stderr.read_text()
        if to_group:
            os.killpg(child.pid, signum)
        else:
            child.send_signal(signum)
        _wait_for(lambda: "stopping the ingest" in stderr.read_text() or child.poll() is not None, "the stop")
        go.touch()
        returncode = child.wait(timeout=120)
    finally:
        go.touch()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # whatever of the command is left, workers included
        child.wait()
    said = stderr.read_text()
    assert returncode == 128 + signum, said
    assert sorted(_lines(begun)) == inputs[:workers]  # the files in hand; none handed out after them was begun
    assert f"stopped by {signal.Signals(signum).name} after {workers} of {len(inputs)} files" in said
    index = ledger_folder(pool, "site_a") / INDEX_FILE
    assert [row["outcome"] for row in _rows(index)] == ["pooled"] * workers  # finished, and recorded

    summary = ingest_site("site_a", site, pool, key=key, quarantine=quarantine, workers=workers, progress=False)
    assert (summary.pooled_before, summary.pooled_new) == (workers, 5 - workers)
    assert summary.counts_in == summary.pooled + sum(summary.quarantined.values()) == len(inputs)
    assert _tree(pool / "site_a") == _tree(tmp_path / "whole" / "site_a")
    assert _rows(index) == _rows(ledger_folder(tmp_path / "whole", "site_a") / INDEX_FILE)
    assert _rows(quarantine / "quarantine.csv") == _rows(tmp_path / "q-whole" / "quarantine.csv")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="tells an ended process by /proc")
def test_a_worker_whose_command_was_killed_ends(tmp_path):
    """A pool's worker waits for work forever once its command is gone: it ends by itself, though the workers of a
    running command ignore a SIGTERM to the group and finish the file in hand. Before, only a signal sent to it
    ended it."""
    begun, go = tmp_path / "begun", tmp_path / "go"
    child = subprocess.Popen(_gated_ingest(tmp_path, 2), stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: len(_lines(begun.with_suffix(".pids"))) == 2 or child.poll() is not None, "both workers busy")
        assert child.poll() is None
        workers = [int(pid) for pid in _lines(begun.with_suffix(".pids"))]
        child.kill()
        child.wait()
        _wait_for(lambda: all(_ended(pid) for pid in workers), "the orphaned workers' end")
    finally:
        go.touch()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


@pytest.mark.parametrize("ignored", [False, True], ids=["heeded", "ignored"])
def test_a_hang_up_the_process_ignores_does_not_stop_the_ingest(tmp_path, monkeypatch, ignored):
    """As under nohup: a signal set to be ignored before the run stays ignored during it."""
    import medtriage.io.ingest as ingest

    build_phi_site(tmp_path / "site")
    judged = ingest.process_file

    def hung_up(source: str):
        out = judged(source)
        if source.endswith("IM0000"):  # while the first file is in progress
            os.kill(os.getpid(), signal.SIGHUP)
        return out

    monkeypatch.setattr(ingest, "process_file", hung_up)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN if ignored else signal.SIG_DFL)
    stopped = pytest.raises(ingest.IngestStopped, match="stopped by SIGHUP after 1 of 10 files")
    try:
        with contextlib.nullcontext() if ignored else stopped:
            summary = ingest_site(
                "site_a", tmp_path / "site", tmp_path / "pool", key=SiteKey(SECRET), quarantine=tmp_path / "q", progress=False
            )
    finally:
        signal.signal(signal.SIGHUP, before)
    if ignored:
        assert summary.pooled_new == 5
