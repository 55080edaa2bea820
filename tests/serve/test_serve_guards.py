"""What guards the service: bounded work (503 + Retry-After), uploads streamed to temporary files,
decode limits as 413, no caching of anything, and `serve` refusing to open PHI to the network."""

from __future__ import annotations

import subprocess

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.io.decode_limits import DecodeLimits, default_limits, set_default_limits
from medtriage.serve.admission import Admission
from medtriage.serve.http import create_app

TOKEN = "guard-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CT = get_testdata_file("CT_small.dcm")


def _client(predictor, **kwargs) -> TestClient:
    return TestClient(create_app(predictor, token=TOKEN, **kwargs))


def _upload(path=CT):
    return [("files", ("ct.dcm", open(path, "rb").read(), "application/dicom"))]


def test_a_full_queue_answers_503_with_retry_after_before_reading_the_body(predictor):
    admission = Admission(workers=1, queue=2)
    client = _client(predictor, admission=admission)
    admission.in_system = admission.capacity  # every slot and queue place taken
    busy = client.post("/v1/score", files=_upload(), headers=AUTH)
    assert busy.status_code == 503 and busy.headers["Retry-After"].isdigit() and "busy" in busy.json()["error"]["reason"]
    assert client.get("/health").status_code == 200  # light routes are not queued
    admission.in_system = 0
    assert client.post("/v1/score", files=_upload(), headers=AUTH).status_code == 200
    assert admission.in_system == 0 and admission.refused == 1  # every admitted request left again


def test_every_answer_says_no_store(predictor):
    client = _client(predictor)
    scored = client.post("/v1/score", files=_upload(), headers=AUTH)
    rows = client.get("/v1/worklist", headers=AUTH)
    overlay = client.get(rows.json()["entries"][0]["overlay"], headers=AUTH)
    refused = client.get("/v1/worklist")
    for response in (scored, rows, overlay, refused, client.get("/worklist"), client.get("/health")):
        assert response.headers["cache-control"] == "no-store", response.request.url
    assert overlay.headers["content-type"] == "image/png" and refused.status_code == 401


def test_an_image_over_the_decode_limits_is_413(predictor):
    client = _client(predictor)
    previous = default_limits()
    set_default_limits(DecodeLimits(max_frame_pixels=64 * 64))
    try:
        response = client.post("/v1/score", files=_upload(), headers=AUTH)
        report = client.post("/v1/sr", content=open(CT, "rb").read(), headers={**AUTH, "Content-Type": "application/dicom"})
    finally:
        set_default_limits(previous)
    assert response.status_code == 413 and response.json()["rejected"][0]["error"] == "ImageTooLargeError"
    assert report.status_code == 413


def test_a_chunked_body_over_the_limit_is_413_and_raw_bodies_still_score(predictor):
    client = _client(predictor, max_bytes=50_000)
    data = open(CT, "rb").read() * 2  # 78 kB, sent without a Content-Length

    def chunks():
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    too_big = client.post("/v1/score", content=chunks(), headers={**AUTH, "Content-Type": "application/dicom"})
    assert too_big.status_code == 413
    raw = client.post("/v1/score", content=open(CT, "rb").read(), headers={**AUTH, "Content-Type": "application/dicom"})
    assert raw.status_code == 200 and raw.json()["results"][0]["sop_uid"] == pydicom.dcmread(CT).SOPInstanceUID


# --- serve's options ---------------------------------------------------------------------------------


@pytest.fixture
def uvicorn_calls(monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    monkeypatch.delenv("MEDTRIAGE_TOKEN", raising=False)
    return calls


def test_a_network_host_without_a_token_is_refused(package_dir, uvicorn_calls, capsys):
    assert main(["serve", str(package_dir), "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err and not uvicorn_calls
    assert main(["serve", str(package_dir), "--host", "0.0.0.0", "--insecure-no-auth"]) == 0
    assert uvicorn_calls[-1]["host"] == "0.0.0.0" and "unencrypted" in capsys.readouterr().err
    assert main(["serve", str(package_dir), "--host", "127.0.0.1"]) == 0  # loopback needs no token


def test_token_file_tls_and_the_token_on_the_command_line(package_dir, uvicorn_calls, tmp_path, capsys, self_signed_tls):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cert, key = self_signed_tls
    assert (
        main(
            [
                "serve",
                str(package_dir),
                "--host",
                "0.0.0.0",
                "--token-file",
                str(token_file),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
            ]
        )
        == 0
    )
    assert uvicorn_calls[-1]["ssl_certfile"] == str(cert) and uvicorn_calls[-1]["ssl_keyfile"] == str(key)
    err = capsys.readouterr().err
    assert "https://0.0.0.0" in err and "token required" in err and "warning" not in err
    assert main(["serve", str(package_dir), "--tls-cert", str(cert)]) == 2  # a certificate without its key
    assert main(["serve", str(package_dir), "--token", TOKEN]) == 0
    assert "visible to every user" in capsys.readouterr().err
    token_file.write_text("")
    assert main(["serve", str(package_dir), "--token-file", str(token_file)]) == 2
    assert "empty" in capsys.readouterr().err


def test_the_token_from_a_file_is_what_the_service_checks(predictor, package_dir, uvicorn_calls, tmp_path, monkeypatch):
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    assert main(["serve", str(package_dir), "--token-file", str(token_file), "--threads", "1"]) == 0
    client = TestClient(apps[-1])
    assert client.get("/v1/model").status_code == 401
    assert client.get("/v1/model", headers=AUTH).status_code == 200


def test_a_token_with_non_ascii_characters_matches_as_its_utf8_bytes(predictor):
    token = "clé-ŝecret-1234"
    client = TestClient(create_app(predictor, token=token))
    sent = b"Bearer " + token.encode()  # what a client puts on the wire for it
    assert client.get("/v1/model", headers={"Authorization": sent}).status_code == 200
    wrong = b"Bearer " + token.replace("é", "e").encode()
    assert client.get("/v1/model", headers={"Authorization": wrong}).status_code == 401


@pytest.mark.parametrize("damaged", ["cert", "key", "other key"])
def test_a_tls_pair_that_does_not_load_is_a_configuration_error_before_the_server_starts(
    package_dir, uvicorn_calls, tmp_path, capsys, self_signed_tls, damaged
):
    """Before, only the files' existence was checked: uvicorn then failed at start with a traceback and exit 1, which a
    unit restarts every 5 s (a credential systemd filled with a note because the file was missing, a key of another
    certificate)."""
    cert, key = self_signed_tls
    if damaged == "other key":
        other = tmp_path / "other.key"
        subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], capture_output=True, check=True, timeout=60)
        key = other
    else:
        placeholder = tmp_path / f"tls.{damaged}"
        placeholder.write_text("none: /etc/medtriage/serve-model.crt was missing when the unit started")
        cert, key = (placeholder, key) if damaged == "cert" else (cert, placeholder)
    assert main(["serve", str(package_dir), "--tls-cert", str(cert), "--tls-key", str(key)]) == 2
    err = capsys.readouterr().err
    assert "cannot load the TLS certificate" in err and str(cert) in err and not uvicorn_calls


def test_the_batching_worker_ends_with_the_server(package_dir, uvicorn_calls):
    """Before, it was left running once the server returned (it died with the process, whatever it held)."""
    import threading

    def batching() -> set[threading.Thread]:  # other tests' batchers may be alive in this process: only its own count
        return {thread for thread in threading.enumerate() if thread.name == "medtriage-batching" and thread.is_alive()}

    before = batching()
    assert main(["serve", str(package_dir), "--max-batch", "4"]) == 0 and uvicorn_calls
    assert batching() <= before
