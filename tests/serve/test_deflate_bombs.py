"""Deflate bombs (tests/io/test_deflate_bombs.py) at the scoring doors: `medtriage score`, POST /v1/score and the
DICOM node's C-STORE, each a real process whose peak memory is measured, and the node's reading of a received
instance's identity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medtriage.errors import DicomError
from medtriage.io.decode_limits import HEADER_BYTES
from medtriage.serve.node.header import HEADER_READ_BYTES, read_identity
from medtriage.serve.node.scp import CANNOT_UNDERSTAND
from tests.io.test_deflate_bombs import BOMB_BYTES, CR_STORAGE, PEAK_BOUND, deflate_bomb, measured_run
from tests.memory import outcome_and_peak_bytes
from tests.ports import free_port
from tests.serve.node.peers import NODE_AET, Listener, wait_for
from tests.serve.test_serve_http import _wait_until_up

MAX_DECODED = 16 << 20
INFLATED_LIMIT = MAX_DECODED + HEADER_BYTES  # what a deflated data set may inflate to under --max-decoded-bytes
TOKEN = "bomb-token-51c2"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    path.write_bytes(deflate_bomb(BOMB_BYTES))
    return path


def _high_water_mark(pid: int) -> int:
    """The most resident memory the process has held, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def test_score_rejects_a_deflate_bomb_before_inflating_it(package_dir, bomb):
    status, output, peak = measured_run(["score", str(package_dir), str(bomb), "--threads", "1", "--max-decoded-bytes", str(MAX_DECODED)])
    assert status == 1, output
    assert "REJECTED" in output and f"inflates to more than {INFLATED_LIMIT} bytes" in output and "--max-decoded-bytes" in output
    assert peak < PEAK_BOUND, f"score peaked at {peak >> 20} MiB"


@pytest.fixture(scope="module")
def server(package_dir):
    port = free_port()
    command = [sys.executable, "-m", "medtriage.cli", "serve", str(package_dir), "--port", str(port), "--threads", "1"]
    command += ["--max-decoded-bytes", str(MAX_DECODED)]
    process = subprocess.Popen(
        command, env={**os.environ, "MEDTRIAGE_TOKEN": TOKEN}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        _wait_until_up(client, process)
        yield client, process
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.parametrize("multipart", [False, True], ids=["application-dicom", "multipart"])
def test_serve_answers_a_deflate_bomb_413_before_inflating_it(server, bomb, multipart):
    client, process = server
    data = bomb.read_bytes()
    if multipart:
        response = client.post("/v1/score", files=[("files", ("bomb.dcm", data, "application/dicom"))])
    else:
        response = client.post("/v1/score", content=data, headers={"content-type": "application/dicom"})
    assert response.status_code == 413, response.text
    body = response.json()
    assert f"inflates to more than {INFLATED_LIMIT} bytes" in body["error"]["reason"]
    [rejected] = body["rejected"]
    assert rejected["error"] == "ImageTooLargeError" and "--max-decoded-bytes" in rejected["hint"]
    assert _high_water_mark(process.pid) < PEAK_BOUND
    assert client.get("/health").status_code == 200


def test_the_node_accepts_deflated_instances_and_refuses_a_bomb_before_inflating_it(package_dir, bomb, tmp_path):
    from pynetdicom import AE, _config

    options = ("--send-to", "PACS@127.0.0.1:1", "--max-decoded-bytes", str(MAX_DECODED))
    node = Listener(package_dir, tmp_path / "state", free_port(), *options).start()
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file goes as it is on disk: never inflated by the sender
    try:
        ae = AE(ae_title="BOMBSCU")
        ae.add_requested_context(CR_STORAGE, DeflatedExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        try:
            [context] = assoc.accepted_contexts
            assert context.transfer_syntax == [DeflatedExplicitVRLittleEndian]
            answer = assoc.send_c_store(bomb)
        finally:
            assoc.release()
        assert answer.Status == CANNOT_UNDERSTAND  # a failure: sending it again changes nothing
        said = f"inflates to more than {INFLATED_LIMIT} bytes"
        wait_for(lambda: said in node.log.read_text(), 30, "the log to say why the instance was refused")
        assert _high_water_mark(node.process.pid) < PEAK_BOUND
        assert not node.counts()["instances"]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assert node.stop() == 0, node.log.read_text()[-3000:]


def test_the_node_reads_a_deflated_instances_identity_without_inflating_the_rest(tmp_path):
    """Within the decode limits, pydicom inflated the whole data set (here 256 MiB) to read a few header elements, in
    each association's thread."""
    path = tmp_path / "large.dcm"
    path.write_bytes(deflate_bomb(256 << 20))
    header, peak = outcome_and_peak_bytes(lambda: read_identity(path))
    assert not isinstance(header, Exception), header
    assert header.sop_class == CR_STORAGE and header.fields["patient_id"] == "P1" and header.fields["modality"] == "CR"
    assert peak < HEADER_READ_BYTES * 2


def test_bulk_data_before_a_deflated_instances_identity_is_skipped_not_held(tmp_path):
    """As in a file that is not deflated: an element among the identifying ones, not named, is passed over."""
    path = tmp_path / "bulk-first.dcm"
    path.write_bytes(deflate_bomb(64 << 20, bulk_group=0x0009))  # a private element ahead of the Patient and Study UIDs
    header, peak = outcome_and_peak_bytes(lambda: read_identity(path, where="C-STORE from MODALITY"))
    assert not isinstance(header, Exception), header
    assert header.fields["patient_id"] == "P1" and header.sop_class == CR_STORAGE
    assert peak < HEADER_READ_BYTES * 2


def test_a_deflated_instance_whose_identity_lies_past_the_read_bound_is_refused(tmp_path):
    """An element of undefined length must be read to find its end: as in a file that is not deflated, the read stops
    at the bound."""
    path = tmp_path / "long-first.dcm"
    path.write_bytes(deflate_bomb(64 << 20, bulk_group=0x0009, undefined_length=True))
    assert len(pydicom.dcmread(path)[0x00091010].value) > HEADER_READ_BYTES  # what the bomb holds, read whole
    refused, peak = outcome_and_peak_bytes(lambda: read_identity(path, where="C-STORE from MODALITY"))
    assert isinstance(refused, DicomError) and f"over {HEADER_READ_BYTES} bytes" in refused.reason and refused.hint, refused
    assert peak < HEADER_READ_BYTES * 2
