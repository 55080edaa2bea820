"""Requests another site's page makes in the reader's browser (the browser names them with Sec-Fetch-Site): a service
without a token (loopback) must not take them, or any web page the radiologist opens could post forged studies into
the worklist, or flood an in-memory one until it forgets real studies. Its own page, and clients that are not browsers,
are served as before."""

from __future__ import annotations

import pytest
from pydicom.data import get_testdata_file

from medtriage.serve.http import OPEN_PATHS, create_app
from tests.serve.test_http_edges import LiveServer

CT = get_testdata_file("CT_small.dcm")


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_an_upload_from_another_sites_page_is_refused_and_records_nothing(predictor, site):
    """Before, a cross-site form post (no preflight: multipart is a 'simple' request) was scored and listed."""
    with LiveServer(create_app(predictor)) as client:
        with open(CT, "rb") as file:
            refused = client.post("/v1/score", files=[("files", ("forged.dcm", file.read()))], headers={"Sec-Fetch-Site": site})
        assert refused.status_code == 403, refused.text[:300]
        assert refused.headers["cache-control"] == "no-store"
        assert "another site" in refused.json()["error"]["reason"] and "/worklist" in refused.json()["error"]["hint"]
        assert client.get("/v1/worklist").json()["count"] == 0
        assert client.get("/v1/worklist", headers={"Sec-Fetch-Site": site}).status_code == 403
        assert 'medtriage_refused_total{reason="cross_site"} 2.0' in client.get("/metrics").text


def test_the_own_page_navigation_and_other_clients_are_served(predictor):
    with LiveServer(create_app(predictor)) as client:
        with open(CT, "rb") as file:
            data = file.read()
        assert client.post("/v1/score", files=[("files", ("a.dcm", data))], headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert client.post("/v1/score", content=data, headers={"Content-Type": "application/dicom"}).status_code == 200  # curl, a PACS
        assert client.get("/v1/worklist", headers={"Sec-Fetch-Site": "none"}).json()["count"] == 1  # typed into the address bar
        for page in ("/worklist", "/docs", "/health"):  # a link from another site to the open pages still opens them
            assert client.get(page, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200, page


def test_the_schema_names_the_refusal_on_every_closed_route(predictor):
    schema = create_app(predictor).openapi()
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert ("403" in operation["responses"]) is (path not in OPEN_PATHS), path
