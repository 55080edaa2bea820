"""The service published by a reverse proxy under a path prefix (https://gateway/medtriage/ -> http://127.0.0.1:PORT/),
started with `--root-path /medtriage`: through a real proxy that strips the prefix as nginx does, the address leads to
the worklist page, which loads, scores a file and shows its row and picture, and /docs and /redoc draw the API, every
request of theirs under the prefix; the route checks (open routes, admission) see the route, not the prefixed path; and
the docs' scripts are cached by the browser while every other answer stays uncached."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import build_parser
from medtriage.serve.admission import Admission
from medtriage.serve.http import create_app
from tests.serve.test_http_edges import LiveServer
from tests.serve.test_serve_http import _wait_until_up, free_port

PREFIX = "/medtriage"
TOKEN = "proxy-token-51c8"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CT = get_testdata_file("CT_small.dcm")
# Headers of one connection, which a proxy does not pass on; Date and Server it writes itself.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "date", "server"}


class _Forward(BaseHTTPRequestHandler):
    """One request to the proxy: outside the prefix a 404, under it the service's answer to the path without it."""

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        if not self.path.startswith(PREFIX + "/"):
            self.send_error(404, "nothing here outside the service's prefix")
            return
        status, headers, body = self._ask_service()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_POST = do_GET

    def _ask_service(self) -> tuple[int, list, bytes]:
        host, port = self.server.upstream
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        headers["Host"] = f"{host}:{port}"  # nginx's default: the upstream's address ($proxy_host)
        connection = http.client.HTTPConnection(host, port, timeout=60)
        try:
            connection.request(self.command, self.path.removeprefix(PREFIX), body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
        finally:
            connection.close()
        kept = [(n, v) for n, v in answer.getheaders() if n.lower() not in HOP_BY_HOP and n.lower() != "content-length"]
        # nginx's `proxy_redirect default`: a Location naming the upstream's root is put under the prefix
        return answer.status, [(n, v.replace(f"http://{host}:{port}/", PREFIX + "/", 1)) for n, v in kept], data

    def log_message(self, *args) -> None:
        pass


class PrefixProxy(ThreadingHTTPServer):
    """A reverse proxy on a loopback port, as nginx's `location /medtriage/ { proxy_pass http://127.0.0.1:PORT/; }`.
    `seen`: the paths asked of it, in order."""

    daemon_threads = True

    def __init__(self, upstream_port: int):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.seen = ("127.0.0.1", upstream_port), []
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def proxied(package_dir):
    """`medtriage serve --root-path /medtriage` with a token, behind a PrefixProxy."""
    port = free_port()
    command = [sys.executable, "-m", "medtriage.cli", "serve", str(package_dir), "--port", str(port), "--threads", "1"]
    env = {**os.environ, "MEDTRIAGE_TOKEN": TOKEN}
    process = subprocess.Popen([*command, "--root-path", PREFIX], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as direct:
            _wait_until_up(direct, process)
        with PrefixProxy(port) as proxy:
            yield proxy
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


class BrowsedPage:
    """A browser page whose requests, console errors and page errors are noted."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1400, "height": 800})
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.requests, self.errors = [], []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def outside(self, proxy: PrefixProxy) -> list[str]:
        """The page's requests that went anywhere but under the proxy's prefix."""
        return [url for url in self.requests if not url.startswith(proxy.base_url + PREFIX + "/") and not url.startswith("blob:")]


@pytest.fixture
def browsed(chromium):
    page = BrowsedPage(chromium)
    yield page
    page.context.close()


def test_the_address_and_the_page_with_a_slash_after_it_redirect_under_the_prefix(proxied):
    with httpx.Client(base_url=proxied.base_url, timeout=30) as client:
        for method in ("GET", "HEAD"):
            home = client.request(method, f"{PREFIX}/")
            assert home.status_code == 307 and home.headers["location"] == f"{PREFIX}/worklist", method
        slash = client.get(f"{PREFIX}/worklist/")  # the router's own redirect, through nginx's Location rewriting
        assert slash.status_code == 307 and slash.headers["location"] == f"{PREFIX}/worklist"
        assert client.get(f"{PREFIX}/v1/worklist").status_code == 401  # the page's data still needs the token


def test_a_radiologist_works_on_the_worklist_through_the_proxy(proxied, browsed):
    page = browsed.page
    assert page.goto(f"{proxied.base_url}{PREFIX}/").status == 200 and urlsplit(page.url).path == f"{PREFIX}/worklist"
    page.wait_for_function("() => document.getElementById('status').textContent.includes('access token')")
    page.fill("#token", TOKEN)
    page.click("#save-token")
    page.set_input_files("#files", [CT])
    page.click("#upload")
    page.wait_for_function("() => document.querySelectorAll('#worklist tbody tr').length > 0")
    assert "1 image(s) scored" in page.text_content("#status")
    page.click("#worklist tbody tr:first-child")
    page.wait_for_function("() => document.getElementById('overlay').complete && document.getElementById('overlay').naturalWidth > 0")
    assert "CT_small.dcm" in page.text_content("#detail-fields")
    assert browsed.outside(proxied) == []
    assert [e for e in browsed.errors if "status of 401" not in e] == []  # only the loads before the token was entered


def test_swagger_ui_and_redoc_draw_and_try_a_route_through_the_proxy(proxied, browsed):
    page = browsed.page
    assert page.goto(f"{proxied.base_url}{PREFIX}/docs").status == 200
    page.locator('.opblock-summary-path[data-path="/v1/score"]').wait_for()
    page.locator('.opblock-summary-path[data-path="/health"]').click()
    page.get_by_role("button", name="Try it out").click()
    page.get_by_role("button", name="Execute").click()
    page.locator(".live-responses-table .response-col_status", has_text="200").wait_for()
    assert f"{PREFIX}/health" in page.locator(".request-url").inner_text()
    assert browsed.errors == []
    assert browsed.outside(proxied) == []
    assert page.goto(f"{proxied.base_url}{PREFIX}/redoc").status == 200
    page.get_by_text("/v1/score", exact=True).first.wait_for(state="attached")
    # ReDoc's side menu always shows Redocly's logo from their CDN: the page's policy stops it before it leaves
    assert [url for url in browsed.outside(proxied) if "cdn.redoc.ly" not in url] == []
    assert [e for e in browsed.errors if "cdn.redoc.ly" not in e] == []


def test_routes_under_a_root_path_are_checked_as_routes(predictor):
    """Open routes stay open and scoring passes admission (here: full, so 503) when uvicorn prefixes the path."""
    admission = Admission(1, 0)
    live = LiveServer(create_app(predictor, token=TOKEN, admission=admission))
    live.server.config.root_path = PREFIX  # as `serve --root-path` has uvicorn do
    with live as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/worklist", "/health"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/worklist").status_code == 401
        assert admission.try_enter()  # the one place there is now taken
        busy = client.post("/v1/score", files={"files": ("ct.dcm", open(CT, "rb").read())}, headers=AUTH)
        assert busy.status_code == 503 and busy.headers["retry-after"], busy.text
        admission.leave()


def test_the_docs_scripts_are_cached_and_every_other_answer_is_not(proxied, browsed):
    with httpx.Client(base_url=proxied.base_url + PREFIX, timeout=30) as client:
        assets = re.findall(r'"(docs/assets/[^"]+)"', client.get("/docs").text)
        assert len(assets) == 3 and all("?v=" in url for url in assets), assets  # the version names what is cached
        for url in assets:
            answer = client.get(f"/{url}")
            assert answer.status_code == 200 and re.fullmatch(r"public, max-age=\d+, immutable", answer.headers["cache-control"]), url
        for path in ("/docs", "/redoc", "/openapi.json", "/worklist", "/health", "/docs/assets/core.py"):
            assert client.get(path).headers["cache-control"] == "no-store", path
        assert client.get("/v1/model", headers=AUTH).headers["cache-control"] == "no-store"
    before = sum("swagger-ui-bundle.js" in path for path in proxied.seen)
    for _ in range(2):  # the second visit takes the scripts from the browser's cache
        assert browsed.page.goto(f"{proxied.base_url}{PREFIX}/docs").status == 200
        browsed.page.locator('.opblock-summary-path[data-path="/v1/score"]').wait_for()
    assert sum("swagger-ui-bundle.js" in path for path in proxied.seen) - before == 1


def test_the_root_path_option_takes_a_plain_path(package_dir, capsys):
    for given, taken in (("/medtriage", "/medtriage"), ("/medtriage/", "/medtriage"), ("/a/b", "/a/b"), ("/", "")):
        assert build_parser().parse_args(["serve", str(package_dir), "--root-path", given]).root_path == taken, given
    for bad in ("medtriage", "/med triage", "/medtriage?x=1", "/med%20triage", "/médtriage"):  # uvicorn puts it in raw paths
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", str(package_dir), "--root-path", bad])
        assert "expected a path such as /medtriage" in capsys.readouterr().err, bad
