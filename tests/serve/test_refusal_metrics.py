"""Requests the service refuses before any work (busy, too large, without the token) are counted on /metrics by
reason: a client retrying into a full queue, or one configured with a wrong token, shows up where operators look."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

from medtriage.serve.admission import Admission
from medtriage.serve.http import create_app
from tests.serve.test_http_edges import LiveServer

TOKEN = "refusal-token-5150"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CT = get_testdata_file("CT_small.dcm")


def refused(client) -> dict[str, float]:
    text = client.get("/metrics", headers=AUTH).text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "medtriage_refused_total"
    }


def test_refusals_are_counted_by_reason(predictor):
    admission = Admission(workers=1, queue=1)
    upload = [("files", ("ct.dcm", open(CT, "rb").read(), "application/dicom"))]
    with LiveServer(create_app(predictor, token=TOKEN, max_bytes=64 * 1024, admission=admission)) as client:
        assert refused(client) == {}
        assert client.get("/v1/worklist", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/score", files=upload * 4, headers=AUTH).status_code == 413  # 4 x 39 kB
        admission.in_system = admission.capacity  # every slot and queue place taken
        assert client.post("/v1/score", files=upload, headers=AUTH).status_code == 503
        assert client.post("/v1/score", files=upload, headers=AUTH).status_code == 503
        admission.in_system = 0
        assert client.post("/v1/score", files=upload, headers=AUTH).status_code == 200
        assert refused(client) == {"unauthorised": 1.0, "too_large": 1.0, "busy": 2.0}
