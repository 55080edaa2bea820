"""The service as an integrator meets it on a real loopback server: HEAD answers like GET, /openapi.json names the
token and the JSON error body, every refusal (an internal error, /v1/sr's out-of-scope image) is that body with what
went wrong and what to do, and a client that hangs up mid-upload frees its place without an internal error."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from pydicom.data import get_testdata_file

from medtriage.serve.admission import Admission
from medtriage.serve.http import OPEN_PATHS, create_app
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.serve.test_http_edges import LiveServer, _all_left
from tests.serve.test_scope import CHEST_XRAY_SCOPE, with_meta

TOKEN = "contract-token-51c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CT = get_testdata_file("CT_small.dcm")
RTPLAN = get_testdata_file("rtplan.dcm")
MAX_BYTES = 2_000_000


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [ref for value in node.values() for ref in _refs(value)]
    return [ref for value in node for ref in _refs(value)] if isinstance(node, list) else []


def test_a_head_request_is_answered_like_its_get_without_a_body(predictor):
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        for path, headers in (("/health", {}), ("/ready", {}), ("/v1/model", AUTH), ("/v1/worklist", AUTH), ("/worklist", {})):
            get, head = client.get(path, headers=headers), client.head(path, headers=headers)
            assert head.status_code == get.status_code == 200, (path, head.status_code)
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
            assert head.headers["cache-control"] == "no-store"
        assert client.head("/worklist").headers["x-frame-options"] == "DENY"
        refused = client.head("/v1/model")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer" and refused.content == b""


def test_the_openapi_schema_names_the_bearer_token_and_the_error_body(predictor):
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        schema = client.get("/openapi.json").json()  # deliberately open, like /docs: it holds no PHI
        assert client.get("/docs").status_code == 200
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            closed = path not in OPEN_PATHS
            assert (operation.get("security") == [{"bearer": []}]) is closed, path
            assert ("401" in operation["responses"]) is closed, path
    score = schema["paths"]["/v1/score"]["post"]["responses"]
    for status in ("400", "401", "408", "413", "415", "422", "503"):
        assert score[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, status
    assert "503" in schema["paths"]["/v1/sr"]["post"]["responses"]
    detail = schema["paths"]["/v1/worklist/{entry_id}"]["get"]["responses"]
    assert detail["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    picture = schema["paths"]["/v1/worklist/{entry_id}/overlay.png"]["get"]["responses"]
    for status in ("404", "409", "410"):
        assert picture[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, status
    # every reference resolves, and none names FastAPI's validation body, which this service never sends
    refs = _refs(schema)
    assert refs and all(ref.removeprefix("#/components/schemas/") in schema["components"]["schemas"] for ref in refs)
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_without_a_token_the_schema_claims_no_auth(predictor):
    schema = create_app(predictor).openapi()
    assert "securitySchemes" not in schema["components"]
    assert not any("security" in op for ops in schema["paths"].values() for op in ops.values())


def test_a_client_that_hangs_up_mid_upload_frees_its_place_and_is_no_internal_error(predictor, caplog):
    admission = Admission(workers=1, queue=2)
    server = LiveServer(create_app(predictor, token=TOKEN, admission=admission))
    data = open(CT, "rb").read()
    multipart = b'--BB\r\nContent-Disposition: form-data; name="files"; filename="ct.dcm"\r\n\r\n' + data[:2000]
    with server as client, caplog.at_level(logging.WARNING):
        for content_type, sent in (("application/dicom", data[:2000]), ("multipart/form-data; boundary=BB", multipart)):
            head = (
                f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(data) + 500}\r\n\r\n"
            )
            with socket.create_connection(("127.0.0.1", server.port)) as hanging:
                hanging.sendall(head.encode() + sent)
                deadline = time.monotonic() + 5
                while not admission.in_system and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert admission.in_system == 1
            assert _all_left(admission), content_type
        assert client.post("/v1/score", content=data, headers={**AUTH, "Content-Type": "application/dicom"}).status_code == 200
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors


@pytest.mark.parametrize(
    "method, path, kwargs, status, reason",
    [
        ("POST", "/v1/score", {"headers": {"Authorization": ""}}, 401, "bearer token"),
        ("POST", "/v1/score", {"headers": {"Authorization": "Bearer wrong"}}, 401, "bearer token"),
        ("DELETE", "/v1/worklist", {}, 405, "method not allowed: DELETE /v1/worklist"),
        ("GET", "/v2/score", {}, 404, "no such route"),
        ("POST", "/v1/score", {"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "unsupported content type"),
        ("POST", "/v1/score", {"content": b""}, 400, "no file"),
        ("POST", "/v1/score", {"files": [("files", ("scan.png", b"\x89PNG\r\n\x1a\n" + bytes(200)))]}, 422, "not a DICOM file"),
        ("POST", "/v1/score", {"files": [("files", ("plan.dcm", open(RTPLAN, "rb").read()))]}, 422, "without pixel data"),
        ("POST", "/v1/score", {"content": bytes(MAX_BYTES + 1), "headers": {"Content-Type": "application/dicom"}}, 413, "exceeds"),
        ("POST", "/v1/score", {"files": [("files", (f"{i}.dcm", b"x" * 16)) for i in range(1000)]}, 422, "no file could be scored"),
        ("POST", "/v1/score", {"files": [("files", ("empty.dcm", b""))]}, 400, "every uploaded file is empty"),
        (
            "POST",
            "/v1/score",
            {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=y"}},
            400,
            "malformed",
        ),
        ("POST", "/v1/sr", {"files": [("files", ("a.dcm", b"x")), ("files", ("b.dcm", b"y"))]}, 400, "exactly one file"),
        ("GET", "/v1/worklist/-1", {}, 404, "no worklist entry"),
        ("GET", "/v1/worklist/1%2F..%2F..", {}, 404, "no such route"),
    ],
)
def test_every_refusal_is_a_json_body_that_says_what_and_what_to_do(predictor, method, path, kwargs, status, reason):
    with LiveServer(create_app(predictor, token=TOKEN, max_bytes=MAX_BYTES)) as client:
        response = client.request(method, path, **{**kwargs, "headers": {**AUTH, **kwargs.get("headers", {})}})
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/json" and response.headers["cache-control"] == "no-store"
    error = response.json()["error"]
    assert reason in error["reason"] and error["hint"], error  # what went wrong, and what to do about it


def test_file_names_with_paths_or_control_characters_are_only_echoed_as_json_text(predictor):
    data = open(CT, "rb").read()
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        for name in ("../../etc/passwd", "a\x07\x1b[31m.dcm"):
            response = client.post("/v1/score", files=[("files", (name, data))], headers=AUTH)
            assert response.status_code == 200 and response.json()["results"][0]["file"]
        rows = client.get("/v1/worklist?limit=-1&offset=99999999999999999999", headers=AUTH)  # the list takes no paging
    assert rows.status_code == 200 and rows.json()["count"] == 1


def test_an_image_out_of_scope_is_refused_by_sr_with_the_field_and_what_to_do(safe_package_dir, tmp_path):
    scoped = Predictor(load_package(with_meta(safe_package_dir, tmp_path / "chest", scope=CHEST_XRAY_SCOPE)), threads=1)
    data = open(CT, "rb").read()
    with LiveServer(create_app(scoped, token=TOKEN)) as client:
        scored = client.post("/v1/score", content=data, headers={**AUTH, "Content-Type": "application/dicom"})
        report = client.post("/v1/sr", content=data, headers={**AUTH, "Content-Type": "application/dicom"})
    (rejected,) = scored.json()["rejected"]
    assert scored.status_code == report.status_code == 422
    error = report.json()["error"]
    assert (error["code"], error["field"], error["type"]) == ("out_of_scope", "modality", "OutOfScopeError")
    assert error["hint"] == rejected["hint"] and "scope" in error["hint"]  # /v1/sr says as much as /v1/score


def test_an_internal_error_is_a_json_body_that_says_what_to_do(predictor, monkeypatch):
    app = create_app(predictor, token=TOKEN)
    with LiveServer(app) as client:
        monkeypatch.setattr("medtriage.serve.worklist.Worklist.rows", lambda self: 1 / 0)
        response = client.get("/v1/worklist", headers=AUTH)
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert "ZeroDivisionError" in error["reason"] and "log" in error["hint"]
