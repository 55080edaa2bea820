"""A source named after a training site is judged by that site's own PSI threshold: /metrics carries the threshold of
each source, with the labels of its alert, so that a rule comparing the PSI with it uses the right one."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from medtriage.serve.http import create_app
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.serve.test_http_edges import AUTH, CT, TOKEN, LiveServer
from tests.serve.test_scope import with_meta


def by_source(text: str, name: str) -> dict[str, float]:
    return {s.labels["source"]: s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def test_each_source_shows_the_threshold_it_is_judged_by(safe_package_dir, tmp_path):
    drift = json.loads((safe_package_dir / "model.json").read_text())["drift"]
    own = {"site-a": drift["psi_threshold"] + 0.5}  # a site's reference rests on fewer images: a higher threshold
    package = load_package(with_meta(safe_package_dir, tmp_path / "sites", drift={**drift, "site_psi_thresholds": own}))
    headers = {**AUTH, "Content-Type": "application/dicom"}
    with LiveServer(create_app(Predictor(package, threads=1), token=TOKEN)) as client:
        for source in ("site-a", "CR_ROOM_2"):
            client.post("/v1/score", content=open(CT, "rb").read(), headers={**headers, "X-Source": source})
        text = client.get("/metrics", headers=AUTH).text
        judged = {s["source"]: s["threshold"] for s in client.get("/v1/drift", headers=AUTH).json()["sources"]}
    thresholds = by_source(text, "medtriage_drift_threshold")
    assert thresholds == judged == {"site-a": own["site-a"], "CR_ROOM_2": drift["psi_threshold"]}
    assert thresholds.keys() == by_source(text, "medtriage_drift_alert").keys()
