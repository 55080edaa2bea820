"""/metrics and /v1/drift on the real HTTP app: counts by reason, latency, per-source drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

from medtriage.serve.http import create_app
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.serve.test_scope import CHEST_XRAY_SCOPE, with_meta


@pytest.fixture(scope="module")
def client(safe_package_dir, tmp_path_factory) -> TestClient:
    scoped = with_meta(safe_package_dir, tmp_path_factory.mktemp("metrics") / "chest", scope=CHEST_XRAY_SCOPE)
    return TestClient(create_app(Predictor(load_package(scoped), threads=1), token="s3cret"))


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_scored_and_rejected_inputs_per_reason(client, tmp_path):
    from medtriage.data.simulate.sites import make_sites

    results = make_sites(out_dir=tmp_path / "sites", limit=3)
    strays = {name for r in results for name in r.stray_files}
    site_files = [p for p in sorted((tmp_path / "sites").rglob("*.dcm")) if p.name not in strays]
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in site_files]
    files += [("files", ("CT_small.dcm", Path(get_testdata_file("CT_small.dcm")).read_bytes(), "application/dicom"))]
    auth = {"Authorization": "Bearer s3cret"}
    response = client.post("/v1/score", files=files, headers={**auth, "X-Source": "CR_ROOM_2"})
    assert response.status_code == 200 and len(response.json()["results"]) == len(site_files)
    assert client.get("/metrics").status_code == 401  # behind the token like the rest of the API
    text = client.get("/metrics", headers=auth).text
    values = samples(text)
    assert values[("medtriage_scored_total", ())] == len(site_files)
    assert values[("medtriage_rejected_total", (("reason", "out_of_scope"),))] == 1
    assert values[("medtriage_scoring_seconds_count", ())] == len(site_files) + 1
    assert ("medtriage_drift_psi", (("feature", "probability"), ("source", "CR_ROOM_2"))) in values
    drift = client.get("/v1/drift", headers=auth).json()
    (source,) = drift["sources"]
    assert source["source"] == "CR_ROOM_2" and source["images"] == len(site_files) and not source["drifting"]
    assert drift["threshold"] >= 0.25 and drift["monitoring"]
