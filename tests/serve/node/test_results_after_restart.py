"""A study scored before the node restarted with another package is reported as its scoring package saw it: the
probability is named by that package's positive label, and the study's reports stay in one series. A result stored
before scores recorded their label takes the loaded package's label only where that package made it."""

from __future__ import annotations

import io
import json
import time

import pydicom

from medtriage.serve.dicom_results import build_study_sr, encoded
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker, as_score
from tests.serve.node.peers import cr_study
from tests.serve.node.test_results_identity import FIELDS, _serving

PROBABILITY_CODE = "p-"  # the SR's probability concept: "p-<label>" in the package's coding scheme


def _effusion_model(predictor):
    """Another package: other label names, another positive label, another model.onnx."""
    version = predictor.package.version + 1
    return _serving(predictor, label_names=["normal", "effusion"], positive_label="effusion", version=version, sha256="cd" * 32)


def _probability_names(items) -> list[str]:
    """The concept names (CodeMeaning) of the probability measurements anywhere in an SR's content tree."""
    found = []
    for item in items:
        concept = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        if item.get("ValueType") == "NUM" and concept.CodeValue.startswith(PROBABILITY_CODE):
            found.append(concept.CodeMeaning)
        found += _probability_names(item.get("ContentSequence", []))
    return found


def _meaning(predictor) -> str:
    """What the tiny package's probability is called: its calibration picks a temperature only when it helps."""
    return "Calibrated probability" if predictor.package.calibrated else "Probability"


def _receive(store: NodeStore, path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store.receive(path.read_bytes(), ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, FIELDS)
    return ds.StudyInstanceUID


def _reports(store: NodeStore, study_uid: str) -> list[pydicom.Dataset]:
    rows = store._execute("SELECT DISTINCT file FROM deliveries WHERE study_uid = ? AND kind = 'sr' ORDER BY id", (study_uid,))
    return [pydicom.dcmread(store.outbox_path(row["file"])) for row in rows]


def test_a_study_closed_after_a_restart_names_the_label_of_the_package_that_scored_it(predictor, tmp_path):
    assert predictor.package.positive_label == "pneumonia"
    (path,) = cr_study(tmp_path / "in", 1, seed=21)
    store = NodeStore(tmp_path / "state")
    study_uid = _receive(store, path)
    assert Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=60).score_queued()
    time.sleep(0.01)
    Worker(store, _effusion_model(predictor), ["PACS@127.0.0.1:1"], study_timeout=0).close_quiet_studies()
    (sr,) = _reports(store, study_uid)
    assert _probability_names(sr.ContentSequence) == [f"{_meaning(predictor)} of pneumonia"]
    store.close()


def test_reports_of_a_study_reopened_after_a_restart_share_a_series(predictor, tmp_path):
    first, late = cr_study(tmp_path / "in", 2, seed=22)
    store = NodeStore(tmp_path / "state")
    for serving in (predictor, _effusion_model(predictor)):  # the late instance arrives after the restart
        study_uid = _receive(store, first if serving is predictor else late)
        time.sleep(0.01)
        worker = Worker(store, serving, ["PACS@127.0.0.1:1"], study_timeout=0)
        assert worker.score_queued() and worker.close_quiet_studies()
    one, two = _reports(store, study_uid)
    assert one.SeriesInstanceUID == two.SeriesInstanceUID and (one.InstanceNumber, two.InstanceNumber) == (1, 2)
    assert one.DeviceSerialNumber == two.DeviceSerialNumber == predictor.package.sha256  # the series' equipment
    assert _probability_names(two.ContentSequence) == [f"{_meaning(predictor)} of pneumonia", f"{_meaning(predictor)} of effusion"]
    store.close()


def _stored_without_label(score) -> dict:
    """A score as a node stored it before scores recorded their positive label."""
    record = json.loads(json.dumps(score.as_dict()))
    del record["positive_label"]
    return record


def test_a_result_stored_without_its_label_is_named_only_by_the_package_that_made_it(predictor, tmp_path):
    (path,) = cr_study(tmp_path, 1, seed=23)
    scores = [as_score(_stored_without_label(score)) for score in predictor.score_file(path)]
    header = pydicom.dcmread(path, stop_before_pixels=True)

    def probability_names(package) -> list[str]:
        sr = build_study_sr([(header, scores)], package)
        return _probability_names(pydicom.dcmread(io.BytesIO(encoded(sr, "the SR", path.name))).ContentSequence)

    assert probability_names(predictor.package) == [f"{_meaning(predictor)} of pneumonia"]
    assert probability_names(_effusion_model(predictor).package) == [f"{_meaning(predictor)} of an unrecorded label"]
