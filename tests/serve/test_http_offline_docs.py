"""The service's pages work on a hospital network without internet access: /docs (Swagger UI) and /redoc draw the API
from scripts the service serves itself, under their Content-Security-Policy, in a browser whose every request to
another host is refused; and the service's address (/) leads to the worklist page, without the token like the page."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from medtriage.serve.http import create_app
from medtriage.serve.worklist import PAGE_PATH
from tests.serve.test_http_edges import TOKEN, LiveServer

LOOPBACK = "127.0.0.1"
CDN_HOSTS = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com", "fonts.googleapis.com", "fastapi.tiangolo.com")
ABSOLUTE_LINK = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def served(predictor):
    """The service with a token, as a hospital runs it, on a loopback port."""
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        yield client


class OfflinePage:
    """A browser page on a network that reaches only this machine: requests to other hosts are aborted and noted, and
    so are the answers, the console's errors and the page's uncaught errors."""

    def __init__(self, browser):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.elsewhere: list[str] = []
        self.answers, self.errors = [], []
        self.context.route("**/*", self._route)
        self.page.on("response", lambda answer: self.answers.append(answer))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _route(self, route) -> None:
        if urlsplit(route.request.url).hostname == LOOPBACK:
            route.continue_()
        else:
            self.elsewhere.append(route.request.url)
            route.abort("internetdisconnected")

    def check_offline(self) -> None:
        """Nothing asked for another host, and no answer names a CDN; the pages themselves link nothing absolute."""
        assert self.elsewhere == []
        for answer in self.answers:
            assert urlsplit(answer.url).hostname == LOOPBACK, answer.url
            text = answer.body().decode("utf-8", "replace")
            assert not [host for host in CDN_HOSTS if host in text], answer.url
            if answer.headers.get("content-type", "").startswith("text/html"):
                assert not ABSOLUTE_LINK.search(text), answer.url


@pytest.fixture
def offline(chromium):
    page = OfflinePage(chromium)
    yield page
    page.context.close()


def test_swagger_ui_draws_every_route_offline_and_tries_one(served, offline):
    paths = served.get("/openapi.json").json()["paths"]
    answer = offline.page.goto(f"{served.base_url}/docs")
    for path in paths:  # each route of the schema, drawn by Swagger UI
        offline.page.locator(f'.opblock-summary-path[data-path="{path}"]').wait_for(timeout=30_000)
    assert answer.status == 200 and "script-src 'self'" in answer.headers["content-security-policy"]
    assert offline.page.locator('.opblock-summary-path[data-path="/v1/score"]').inner_text().replace("\u200b", "") == "/v1/score"
    offline.page.locator('.opblock-summary-path[data-path="/health"]').click()  # and its requests reach the service
    offline.page.get_by_role("button", name="Try it out").click()
    offline.page.get_by_role("button", name="Execute").click()
    offline.page.locator(".live-responses-table .response-col_status", has_text="200").wait_for(timeout=30_000)
    assert offline.errors == []  # no script, style or request refused by the page's policy
    offline.check_offline()


def test_redoc_draws_the_routes_offline(served, offline):
    answer = offline.page.goto(f"{served.base_url}/redoc")
    offline.page.get_by_text("/v1/score", exact=True).first.wait_for(state="attached", timeout=30_000)
    assert answer.status == 200 and "script-src 'self'" in answer.headers["content-security-policy"]
    assert offline.page.get_by_text("Score DICOM files", exact=False).count() > 0
    # ReDoc's side menu always shows Redocly's logo from their CDN: the page's policy stops it before any request
    blocked_logo = [e for e in offline.errors if "cdn.redoc.ly" in e and "violates the following Content Security Policy" in e]
    assert offline.errors == blocked_logo
    offline.check_offline()


def test_the_scripts_of_the_docs_are_open_and_nothing_else_is(served):
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
        assert served.get(f"/docs/assets/{name}").status_code == 200, name  # no token: the pages that load them are open
    assert served.get("/docs/assets/core.py").status_code == 401


def test_the_address_of_the_service_leads_to_the_worklist_page(served, offline):
    for method in ("GET", "HEAD"):
        answer = served.request(method, "/", follow_redirects=False)  # no token: the page it leads to needs none
        assert answer.status_code == 307 and answer.headers["location"] == PAGE_PATH, method
    assert served.get("/v1/worklist", follow_redirects=False).status_code == 401  # what the page reads still does
    page = offline.page
    assert page.goto(f"{served.base_url}/").status == 200 and urlsplit(page.url).path == PAGE_PATH
