"""DNS rebinding: a page on a domain its owner re-points at 127.0.0.1 is same-origin with a service on loopback, so
Sec-Fetch-Site does not stop it. Without a token, such a service answers only requests whose Host names this machine;
others are refused 421 with the JSON error body and counted. A service with a token, or on a network address, checks
no Host."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.serve.cli import loopback_hosts_only
from medtriage.serve.http import create_app, is_loopback_host
from tests.serve.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.serve.test_http_edges import LiveServer

CT = get_testdata_file("CT_small.dcm")
TOKEN = "host-check-token-4711"


def _request(port: int, host: str, method: str = "GET", path: str = "/v1/worklist", body: bytes | None = None, headers=None):
    """(status, headers, JSON body or None) of one request whose Host header is `host`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        answer = conn.getresponse()
        data = answer.read()
        is_json = answer.getheader("content-type", "").startswith("application/json")
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, json.loads(data) if is_json else None
    finally:
        conn.close()


@pytest.fixture
def served_app(package_dir, monkeypatch):
    """The app `medtriage serve PACKAGE OPTIONS` would run (uvicorn.run stubbed out)."""
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    monkeypatch.delenv("MEDTRIAGE_TOKEN", raising=False)

    def serve(*options: str):
        assert main(["serve", str(package_dir), *options, "--threads", "1"]) == 0
        return apps[-1]

    return serve


def test_loopback_host_names_are_served(predictor):
    with LiveServer(create_app(predictor, loopback_hosts_only=True)) as client:
        port = client.base_url.port
        for host in ("localhost", f"localhost:{port}", "LocalHost", f"127.0.0.1:{port}", "127.1.2.3", f"[::1]:{port}", "[::1]"):
            status, _, body = _request(port, host)
            assert status == 200 and body["count"] == 0, host
        assert client.get("/v1/worklist").status_code == 200  # what an ordinary client sends: 127.0.0.1:PORT


def test_a_request_without_host_is_served(predictor):
    """HTTP/1.0 allows it; every browser sends Host, so such a request is no web page."""
    with LiveServer(create_app(predictor, loopback_hosts_only=True)) as client:
        with socket.create_connection(("127.0.0.1", client.base_url.port), timeout=30) as conn:
            conn.sendall(b"GET /v1/worklist HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_another_host_is_refused_on_every_route_with_the_json_error_and_counted(predictor):
    with LiveServer(create_app(predictor, loopback_hosts_only=True)) as client:
        port = client.base_url.port
        status, headers, body = _request(port, f"evil.example:{port}")
        assert status == 421 and headers["cache-control"] == "no-store"
        assert "evil.example" in body["error"]["reason"] and f"http://127.0.0.1:{port}/worklist" in body["error"]["hint"]
        assert "--token-file" in body["error"]["hint"]
        with open(CT, "rb") as file:
            posted = _request(port, "evil.example", "POST", "/v1/score", file.read(), {"Content-Type": "application/dicom"})
        assert posted[0] == 421
        for host in ("127.0.0.1.evil.example", "localhost.evil.example", "[::2]", "localhost:80:80", "0.0.0.0"):
            assert _request(port, host, path="/worklist")[0] == 421, host  # open routes too
        assert client.get("/v1/worklist").json()["count"] == 0  # the forged study was not recorded
        assert 'medtriage_refused_total{reason="wrong_host"} 7.0' in client.get("/metrics").text


def test_the_schema_lists_the_421_only_where_the_host_is_checked(predictor):
    checked = create_app(predictor, loopback_hosts_only=True).openapi()
    unchecked = create_app(predictor).openapi()
    for schema, listed in ((checked, True), (unchecked, False)):
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                assert ("421" in operation["responses"]) is listed, path
    assert checked["paths"]["/v1/worklist"]["get"]["responses"]["421"]["content"]["application/json"]


def test_serve_on_loopback_without_a_token_checks_the_host(served_app):
    """Before, the default `medtriage serve PACKAGE` served a rebinding page's requests."""
    with LiveServer(served_app()) as client:
        port = client.base_url.port
        assert _request(port, f"evil.example:{port}")[0] == 421
        assert _request(port, f"localhost:{port}")[0] == 200


def test_serve_with_a_token_or_on_a_network_address_checks_no_host(served_app, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    with LiveServer(served_app("--token-file", str(token_file))) as client:
        port = client.base_url.port
        assert _request(port, "medtriage.example", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert _request(port, "medtriage.example")[0] == 401  # the token guards it
    with LiveServer(served_app("--host", "0.0.0.0", "--insecure-no-auth")) as client:
        assert _request(client.base_url.port, "medtriage.example")[0] == 200


def test_a_page_on_a_rebound_domain_reads_nothing_in_a_browser(predictor, need_tool):
    """Chromium resolving rebind.example to 127.0.0.1 (as the attacker's DNS would): its page and its requests are
    refused, while the service's own address still opens the worklist."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    need_tool(str(CHROMIUM), "apt-get install chromium")
    rules = "--host-resolver-rules=MAP rebind.example 127.0.0.1"
    with LiveServer(create_app(predictor, loopback_hosts_only=True)) as client, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, rules])
        try:
            page = browser.new_page()
            port = client.base_url.port
            for path in ("/worklist", "/v1/worklist"):
                answer = page.goto(f"http://rebind.example:{port}{path}")
                assert answer.status == 421 and "not to this machine" in answer.json()["error"]["reason"], path
            assert page.goto(f"http://127.0.0.1:{port}/worklist").status == 200
        finally:
            browser.close()


@pytest.mark.parametrize(
    ("value", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST:8000", True),
        ("127.0.0.1", True),
        ("127.255.0.9:1", True),
        ("[::1]", True),
        ("[0:0:0:0:0:0:0:1]:8000", True),
        (" localhost:8000 ", True),
        ("evil.example", False),
        ("evil.example:8000", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("::1", False),  # an IPv6 address without brackets is no Host
        ("10.0.0.1:8000", False),
        ("0.0.0.0", False),
        ("127.1", False),  # browsers send the dotted form
        ("localhost:8000:1", False),
        ("", False),
    ],
)
def test_which_host_names_are_loopback(value, loopback):
    assert is_loopback_host(value) is loopback


@pytest.mark.parametrize(
    ("host", "token", "checked"),
    [
        ("127.0.0.1", None, True),
        ("localhost", None, True),
        ("::1", None, True),
        ("127.0.0.1", TOKEN, False),
        ("0.0.0.0", None, False),  # only with --insecure-no-auth: another layer guards it
        ("192.168.1.5", TOKEN, False),
    ],
)
def test_only_a_loopback_service_without_a_token_checks_the_host(host, token, checked):
    assert loopback_hosts_only(host, token) is checked
