"""The real service: uvicorn in a subprocess on a free localhost port, hit with good and bad requests."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.ports import free_port

TOKEN = "test-token-7f3a"
MAX_BYTES = 2_000_000
CT, MR, RTPLAN = (get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(package_dir):
    port = free_port()
    env = {**os.environ, "MEDTRIAGE_TOKEN": TOKEN}
    command = [
        sys.executable,
        "-m",
        "medtriage.cli",
        "serve",
        str(package_dir),
        "--port",
        str(port),
        "--max-bytes",
        str(MAX_BYTES),
        "--threads",
        "1",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait_until_up(client, process)
        yield client
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _wait_until_up(client: httpx.Client, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read()}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError("server did not come up in 90 s")


def files(*paths):
    return [("files", (os.path.basename(p), open(p, "rb").read(), "application/dicom")) for p in paths]


def assert_json_error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["reason"]


def test_health_ready_and_model_metadata(server, package_dir):
    assert server.get("/health").json() == {"status": "ok"}
    ready = server.get("/ready").json()
    assert ready["ready"] is True and ready["provider"] == "CPUExecutionProvider"
    model = server.get("/v1/model", headers=AUTH).json()
    assert model["name"] == "tiny-pneumonia" and model["sha256"] == ready["model"]["sha256"]
    assert "/v1/score" in server.get("/openapi.json").json()["paths"]


def test_a_good_file_and_a_batch_are_scored(server):
    (result,) = server.post("/v1/score", files=files(CT), headers=AUTH).json()["results"]
    assert result["sop_uid"] == pydicom.dcmread(CT).SOPInstanceUID and 0 <= result["probability"] <= 1
    raw = server.post("/v1/score", content=open(CT, "rb").read(), headers={**AUTH, "Content-Type": "application/dicom"})
    assert raw.json()["results"][0]["probability"] == pytest.approx(result["probability"])
    batch = server.post("/v1/score", files=files(CT, MR, RTPLAN), headers=AUTH)
    assert batch.status_code == 200
    body = batch.json()
    assert [r["file"] for r in body["results"]] == ["CT_small.dcm", "MR_small.dcm"]
    assert body["rejected"][0]["file"] == "rtplan.dcm" and "RT Plan" in body["rejected"][0]["reason"]


def test_sr_endpoint_returns_a_dicom_sr(server):
    response = server.post("/v1/sr", files=files(CT), headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(response.content))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == pydicom.dcmread(CT).StudyInstanceUID


@pytest.mark.parametrize(
    "request_kwargs, status, reason",
    [
        ({"files": [("files", ("junk.dcm", b"\x00garbage" * 50, "application/dicom"))]}, 422, "not a DICOM file"),
        ({"content": b"", "headers": {"Content-Type": "application/dicom"}}, 400, "no file"),
        ({"files": [("files", ("empty.dcm", b"", "application/dicom"))]}, 400, "empty"),
        ({"files": files(RTPLAN)}, 422, "without pixel data"),
        ({"content": b"x" * (MAX_BYTES + 1)}, 413, "exceeds the limit"),
        ({"content": iter([b"x" * 500_000] * 5)}, 413, "exceeds the limit"),  # chunked: no Content-Length
        ({"content": b"--xx\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=yy"}}, 400, "multipart"),
        ({"files": {"note": (None, "a field, no file")}}, 400, "no file"),
        ({"data": {"note": "a form"}}, 415, "unsupported content type"),
    ],
    ids=["garbage", "empty-body", "empty-file", "non-image", "huge", "huge-chunked", "bad-multipart", "no-file-field", "form"],
)
def test_bad_requests_get_a_4xx_json_error_and_the_service_keeps_serving(server, request_kwargs, status, reason):
    kwargs = {**request_kwargs, "headers": {**AUTH, **request_kwargs.get("headers", {})}}
    response = server.post("/v1/score", **kwargs)
    assert_json_error(response, status)
    assert reason in response.json()["error"]["reason"]
    assert server.post("/v1/score", files=files(MR), headers=AUTH).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_missing_or_wrong_token_is_401(server, headers):
    response = server.post("/v1/score", files=files(CT), headers=headers)
    assert_json_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert server.get("/v1/model", headers=headers).status_code == 401
    assert server.get("/health").status_code == 200
