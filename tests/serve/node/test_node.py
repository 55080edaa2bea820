"""The DICOM node against real peers: dcmtk storescu and Orthanc send to `medtriage listen`, which sends
one SR per scored study back to Orthanc (C-STORE, or STOW-RS into its DICOMweb plugin)."""

from __future__ import annotations

import io
import ssl
import subprocess

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.serve.http import create_app
from medtriage.serve.node.worker import urgency
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection
from tests.serve.node.peers import (
    NODE_AET,
    Listener,
    cr_study,
    echo,
    free_port,
    referenced_sops,
    send_files,
    srs,
    start_listener,
    storescu,
    storescu_by_syntax,
    wait_for,
    wait_for_srs,
)

# Real files in the transfer syntaxes the node accepts: uncompressed, JPEG baseline/extended/lossless,
# JPEG 2000, JPEG-LS, RLE. The MR_small variants are one SOP instance in several encodings.
PYDICOM_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "JPEG-LL.dcm",
    "JPEG-lossy.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
]


def expected_results(predictor: Predictor, paths) -> dict[str, dict[str, dict]]:
    """Study UID -> SOP UID -> the most urgent score of that file, computed here with the same package."""
    studies: dict[str, dict[str, dict]] = {}
    for path in paths:
        outcome = predictor.score_or_reject(path, str(path))
        if not isinstance(outcome, Rejection):
            top = min((s.as_dict() for s in outcome), key=urgency)
            studies.setdefault(top["study_uid"], {})[top["sop_uid"]] = top
    return studies


def test_listen_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["listen", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    for option in (
        "--aet",
        "--port",
        "--send-to",
        "--state",
        "--dicomweb",
        "--allow-aet",
        "--tls-cert",
        "--tls-key",
        "--study-timeout",
        "--heatmaps",
        "--retry-max",
        "--max-batch",
        "--batch-wait-ms",
        "--reduced-j2k",
        "--max-instance-bytes",
        "--max-associations",
        "--associate-timeout",
        "AET@HOST:PORT",
    ):
        assert option in text
    assert "C-STORE" in text and "restart" in text


def test_listen_refuses_a_limit_that_would_refuse_everything(tmp_path, capsys):
    code = main(["listen", str(tmp_path), "--send-to", "PACS@127.0.0.1:4242", "--state", str(tmp_path / "s"), "--max-instance-bytes", "0"])
    assert code != 0 and "--max-instance-bytes must be positive" in capsys.readouterr().err


def test_storescu_files_get_one_sr_per_study_back_in_orthanc(listener, orthanc, predictor, storescu_exe, need_tool, tmp_path):
    files = [get_testdata_file(name) for name in PYDICOM_FILES] + cr_study(tmp_path, 3, seed=1)
    runs = storescu_by_syntax(storescu_exe, listener.port, files)
    assert all(run.returncode == 0 for run in runs), [run.stderr[-500:] for run in runs]
    expected = expected_results(predictor, files)  # what the package scores; the rest is outside its scope
    assert 3 in {len(sops) for sops in expected.values()}  # the chest X-ray study, at least

    found = wait_for_srs(orthanc, expected)
    dsrdump = need_tool("dsrdump", "apt-get install dcmtk")
    for study_uid, sops in expected.items():
        (sr,) = found[study_uid]  # one SR per study
        assert sorted(referenced_sops(sr)) == sorted(sops)
        assert sr.StudyInstanceUID == study_uid and sr.Manufacturer == "MedTriage"
        path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(path)
        dump = subprocess.run([dsrdump, "+Pu", str(path)], capture_output=True, text=True, timeout=30, check=False)
        assert dump.returncode == 0, dump.stderr
        assert "Imaging Measurement Report" in dump.stdout and predictor.package.name in dump.stdout
        for sop in sops:
            assert sop in dump.stdout  # each instance is referenced in the content tree too
    every_study = {pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID for path in files}
    counts = wait_for(lambda: (c := listener.counts())["studies"].get("receiving", 0) == 0 and c, 20, "every study closed")
    assert counts["studies"].get("not_analysed", 0) >= len(every_study - set(expected))
    for study_uid in every_study - set(expected):
        assert not srs(orthanc, study_uid)  # nothing scored, no SR


def test_the_node_counts_what_it_scored_and_refused_per_calling_ae(listener, storescu_exe, tmp_path):
    files = cr_study(tmp_path, 4, seed=7)
    files[-1].write_bytes(files[-1].read_bytes()[:-300])  # pixel data cut short: stored, then refused when scored
    assert storescu(storescu_exe, listener.port, files[:-1]).returncode == 0
    assert send_files(listener.port, files[-1:]) == {files[-1]: 0x0000}
    wait_for(lambda: listener.counts()["instances"].get("received", 0) == 0, 30, "every instance scored or refused")
    text = httpx.get(listener.metrics_url, timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("medtriage_")}
    assert values["medtriage_scored_total"] >= 3
    assert sum(v for k, v in values.items() if k.startswith("medtriage_rejected_total{")) >= 1
    assert values["medtriage_scoring_seconds_count"] >= 4


def test_the_same_instance_sent_twice_gives_one_result(listener, orthanc, storescu_exe, tmp_path):
    files = cr_study(tmp_path, 2, seed=2)
    assert storescu(storescu_exe, listener.port, files).returncode == 0
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    (first,) = wait_for_srs(orthanc, [study_uid])[study_uid]
    assert storescu(storescu_exe, listener.port, files).returncode == 0  # the PACS sends it again
    assert storescu(storescu_exe, listener.port, files[:1]).returncode == 0
    wait_for(lambda: listener.counts()["studies"].get("receiving", 0) == 0, 10, "the node to settle")
    (again,) = srs(orthanc, study_uid)
    assert again.SOPInstanceUID == first.SOPInstanceUID


def test_orthanc_pushes_a_study_and_gets_its_sr(listener, orthanc, predictor, tmp_path):
    files = cr_study(tmp_path, 4, seed=3)
    ids = {orthanc.upload(path) for path in files}
    study_id = orthanc.http.get(f"/instances/{next(iter(ids))}/study").json()["ID"]
    response = orthanc.http.post("/modalities/medtriage/store", json={"Resources": [study_id], "Synchronous": True})
    assert response.status_code == 200, response.text
    expected = expected_results(predictor, files)
    ((study_uid, sops),) = expected.items()
    (sr,) = wait_for_srs(orthanc, [study_uid])[study_uid]
    assert sorted(referenced_sops(sr)) == sorted(sops)


def test_bad_input_gets_a_clean_status_or_a_recorded_rejection(listener, orthanc, tmp_path, package_dir):
    good, truncated, undecodable = cr_study(tmp_path / "bad", 3, seed=4)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 300])  # pixel data cut short
    ds = pydicom.dcmread(undecodable)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit  # "JPEG" bytes that are not JPEG
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not a jpeg stream \xff\xd9"])
    ds.save_as(undecodable, enforce_file_format=True)
    garbled = tmp_path / "garbled.dcm"  # a header that ends in the middle of an element
    raw = pydicom.dcmread(cr_study(tmp_path / "garbled", 1, seed=5)[0])
    raw.save_as(garbled, enforce_file_format=True)
    garbled.write_bytes(garbled.read_bytes()[:400])

    statuses = send_files(listener.port, [truncated, undecodable])
    assert set(statuses.values()) == {0x0000}  # stored: decoding happens later, and fails as a recorded rejection
    assert send_files(listener.port, [garbled])[garbled] != 0x0000  # 0xC210 (or refused before sending): never "stored"
    sr = get_testdata_file("rtplan.dcm")  # a non-image object: no presentation context for it
    assert send_files(listener.port, [sr]) == {sr: None}
    assert echo(listener.port) and listener.process.poll() is None

    study_uid = pydicom.dcmread(good, stop_before_pixels=True).StudyInstanceUID
    wait_for(lambda: listener.counts()["instances"].get("rejected", 0) >= 2, 20, "the rejections recorded")
    app = TestClient(create_app(Predictor(load_package(package_dir), threads=1), state=str(listener.state)))
    wait_for(lambda: _row(app, study_uid), 20, "the study on the worklist")
    row = wait_for(lambda: (r := _row(app, study_uid)) and r["state"] == "not analysed" and r, 20, "not analysed")
    assert "truncated" in row["reason"] and row["reason"].count("instance(s)") == 2 and row["priority"] is None
    assert not srs(orthanc, study_uid)  # no SR for a study with nothing scored


def _row(client, study_uid: str) -> dict | None:
    entries = client.get("/v1/worklist").json()["entries"]
    return next((e for e in entries if e["study_uid"] == study_uid), None)


def test_the_worklist_reads_the_nodes_store(listener, predictor, package_dir, storescu_exe, orthanc, tmp_path):
    files = cr_study(tmp_path, 3, seed=6)
    assert storescu(storescu_exe, listener.port, files).returncode == 0
    ((study_uid, sops),) = expected_results(predictor, files).items()
    wait_for_srs(orthanc, [study_uid])
    client = TestClient(create_app(Predictor(load_package(package_dir), threads=1), state=str(listener.state)))
    row = wait_for(lambda: (r := _row(client, study_uid)) and r["state"] == "delivered" and r, 20, "delivered")
    top = min(sops.values(), key=urgency)
    assert row["priority"] == top["priority"] and row["probability"] == pytest.approx(top["probability"], abs=1e-6)
    assert row["instances"] == 3 and row["patient_id"] == "PSEUDO-1" and row["accession"] == "ACC00006"
    detail = client.get(f"/v1/worklist/{row['id']}").json()
    assert detail["sop_uid"] == top["sop_uid"]
    png = client.get(row["overlay"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_stow_rs_into_orthanc_dicomweb_with_a_heatmap(package_dir, orthanc, predictor, storescu_exe, tmp_path):
    port = free_port()
    node = start_listener(package_dir, tmp_path / "state", port, orthanc, "--dicomweb", orthanc.dicomweb, "--heatmaps")
    try:
        files = cr_study(tmp_path, 2, seed=7)
        assert storescu(storescu_exe, port, files).returncode == 0
        ((study_uid, sops),) = expected_results(predictor, files).items()
        (sr,) = wait_for_srs(orthanc, [study_uid])[study_uid]
        assert sorted(referenced_sops(sr)) == sorted(sops)
        secondary_capture = "1.2.840.10008.5.1.4.1.1.7"

        def heatmaps():
            stored = [pydicom.dcmread(io.BytesIO(orthanc.instance_file(i["ID"]))) for i in orthanc.find(StudyInstanceUID=study_uid)]
            return [ds for ds in stored if ds.SOPClassUID == secondary_capture]

        (picture,) = wait_for(heatmaps, 20, "the heatmap Secondary Capture", interval=0.5)
        assert picture.PhotometricInterpretation == "RGB" and picture.pixel_array.std() > 0
    finally:
        assert node.stop() == 0


def test_tls_and_allowed_callers(package_dir, orthanc, tmp_path, self_signed_tls):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cert, key = self_signed_tls
    port = free_port()
    node = Listener(
        package_dir,
        tmp_path / "state",
        port,
        "--send-to",
        f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--allow-aet",
        "WARD-SCU",
    )
    node.state.mkdir(parents=True)
    with open(node.log, "ab") as log:
        node.process = subprocess.Popen(node.command, stdout=log, stderr=subprocess.STDOUT)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))

    def echo_as(calling: str, tls: bool) -> bool:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, tls_args=(client, "localhost") if tls else None)
        if not assoc.is_established:
            return False
        ok = assoc.send_c_echo().Status == 0
        assoc.release()
        return ok

    try:
        wait_for(lambda: echo_as("WARD-SCU", tls=True), 60, "the TLS listener")
        assert not echo_as("OTHER-SCU", tls=True)  # not on --allow-aet
        assert not echo_as("WARD-SCU", tls=False)  # plain TCP to a TLS port
    finally:
        assert node.stop() == 0


@pytest.mark.slow
def test_the_worklist_page_shows_the_nodes_study_states(listener, package_dir, chromium, tmp_path):
    """`medtriage serve --state` on the node's folder, in Chromium: delivered and not-analysed studies with reasons."""
    import os
    import signal
    import sys

    import httpx

    from tests.serve.node.peers import MAIN
    from tests.serve.test_serve_http import _wait_until_up

    wait_for(lambda: {"delivered", "not_analysed"} <= set(listener.counts()["studies"]), 30, "earlier tests' studies")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", MAIN, "serve", str(package_dir), "--port", str(port), "--threads", "1", "--state", str(listener.state)],
        env={**os.environ, "MEDTRIAGE_TOKEN": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_until_up(client, server)
        page = chromium.new_page(viewport={"width": 1400, "height": 720})
        page.goto(f"http://127.0.0.1:{port}/worklist")
        page.wait_for_function("() => document.querySelectorAll('#worklist tbody tr').length > 1")
        rows = page.eval_on_selector_all("#worklist tbody tr", "rows => rows.map(r => [r.dataset.state, r.dataset.priority])")
        assert {"delivered", "not analysed"} <= {state for state, _ in rows}
        ranks = [{"URGENT": 0, "review": 1, "": 2, "routine": 3}[priority] for _, priority in rows]
        assert ranks == sorted(ranks)  # a study without a score before the routine ones, after the urgent and review
        page.click("#worklist tbody tr[data-state='not analysed']")
        page.wait_for_function("() => document.getElementById('detail-fields').textContent.includes('Reason')")
        assert "instance(s)" in page.text_content("#detail-fields")  # the rejection reasons
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
