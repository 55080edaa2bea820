"""What an ingest reads and who it shares a site with: files under hidden names (notebook checkpoints, trash folders,
OS and editor files) are not inputs, and a second ingest of a site while one runs is refused, not interleaved."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtriage.errors import MedTriageError
from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_ledger import INDEX_FILE, ledger_folder
from medtriage.io.site_folder import read_site_folder
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site

SECRET = b"test-site-secret-0123456789abcdef"
KEY = SiteKey(SECRET)
# Runs ingest in a child that, on its first pooled file, leaves its temporary file in place, says so, and waits to be
# let go before it renames that file into place (as write_pooled does).
PAUSED_INGEST = textwrap.dedent(f"""
    import os, sys, time
    from pathlib import Path
    import medtriage.io.ingest as ingest
    import medtriage.io.ingest_ledger as ledger
    from medtriage.io.site_key import SiteKey

    real, paused = ledger.write_pooled, []
    src, pool, quarantine, ready, go = sys.argv[1:6]

    def paused_write(path, data):
        path = Path(path)
        if path.suffix != ".dcm" or paused:
            return real(path, data)
        paused.append(path)
        partial = path.with_name("." + path.name + ".0.partial")
        partial.write_bytes(data)
        Path(ready).touch()
        deadline = time.monotonic() + 30
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.replace(partial, path)
        return path

    ledger.write_pooled = paused_write
    summary = ingest.ingest_site("site_a", src, pool, key=SiteKey({SECRET!r}), quarantine=quarantine, progress=False)
    print(summary.line())
""")


def _copy_with_new_uid(source: Path, target: Path) -> None:
    """A copy as a notebook checkpoint or the trash keeps it: the same image under another SOP Instance UID, which
    the ingest would pool as one more image."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(target)])
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)


def test_files_under_hidden_names_are_left_out_and_counted(tmp_path):
    site = build_phi_site(tmp_path / "site")
    first = site["pooled"][0]
    _copy_with_new_uid(first, tmp_path / "site" / ".ipynb_checkpoints" / "IM0000-checkpoint")
    _copy_with_new_uid(first, first.parent / ".Trash-1000" / "files" / "IM0000")
    (tmp_path / "site" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (first.parent / ".IM0000.swp").write_bytes(b"b0VIM 9.0")

    summary = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, quarantine=tmp_path / "q", progress=False)

    assert summary.counts_in == 10 and summary.pooled == 5 and summary.hidden == 4
    assert len(list((tmp_path / "pool" / "site_a").glob("*.dcm"))) == 5  # no checkpoint or trash copy pooled
    with open(tmp_path / "q" / "quarantine.csv", newline="") as f:
        sources = [Path(row["source"]).relative_to(tmp_path / "site").parts for row in csv.DictReader(f)]
    assert sources and not [parts for parts in sources if any(name.startswith(".") for name in parts)]
    assert "left out 4 hidden file(s)" in summary.line()
    assert json.loads(Path(summary.log_path).read_text())["counts"]["hidden_left_out"] == 4


def _wait_for(path: Path, child: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the first ingest never reached its first pooled file"
        time.sleep(0.02)


def test_a_second_ingest_of_a_site_while_one_runs_is_refused_and_leaves_the_first_intact(tmp_path):
    build_phi_site(tmp_path / "site")
    ready, go = tmp_path / "ready", tmp_path / "go"
    args = [str(tmp_path / "site"), str(tmp_path / "pool"), str(tmp_path / "q"), str(ready), str(go)]
    first = subprocess.Popen([sys.executable, "-c", PAUSED_INGEST, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready, first)
        in_flight = list((tmp_path / "pool" / "site_a").glob(".*.partial"))
        with pytest.raises(MedTriageError, match="another ingest of site 'site_a'.*running.*wait for it to finish"):
            ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, quarantine=tmp_path / "q", progress=False)
        assert in_flight and all(p.exists() for p in in_flight)  # the first ingest's temporary file was not touched
    finally:
        go.touch()
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "pooled 5 (5 new)" in out

    with open(ledger_folder(tmp_path / "pool", "site_a") / INDEX_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len({row["content_key"] for row in rows}) == 10  # one row per input, written by one ingest
    again = ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, quarantine=tmp_path / "q", progress=False)
    assert again.pooled == 5 and again.pooled_new == 0  # the lock went with the first ingest


def test_the_ingest_command_lists_the_site_folder_once(tmp_path, monkeypatch, capsys):
    """Before, `medtriage ingest` listed the site folder to refuse an empty one, then again to ingest it: a walk of
    every folder of the export, twice."""
    import medtriage.io.ingest
    from medtriage.cli import main as cli_main

    listed = []
    monkeypatch.setattr(medtriage.io.ingest, "read_site_folder", lambda folder: listed.append(folder) or read_site_folder(folder))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    key = tmp_path / "site.key"
    key.write_bytes(SECRET)
    key.chmod(0o600)
    argv = ["ingest", str(tmp_path / "site"), "--site", "a", "--into", str(tmp_path / "pool"), "--secret-file", str(key)]
    assert cli_main(argv) == 0
    assert listed == [(tmp_path / "site").resolve()] and "in 1 = pooled 1" in capsys.readouterr().out
