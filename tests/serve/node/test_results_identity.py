"""Which model made a result, as the PACS shows it: the triage SR and the heatmap Secondary Capture name the package
that scored the image (name, version, sha256 of model.onnx) in the General Equipment attributes, the Contributing
Equipment Sequence, the SR's algorithm identification (TID 4019) and the heatmap's derivation description. A node
restarted with another package closes studies scored before: their report names the package that scored them, and
no heatmap is drawn by a model that did not score the image."""

from __future__ import annotations

import copy
import dataclasses
import io
import subprocess
import time

import pydicom
import pytest
from pydicom.sr.codedict import codes

from medtriage.errors import MedTriageError
from medtriage.serve.dicom_results import encoded, sr_bytes
from medtriage.serve.node.heatmap import secondary_capture
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from medtriage.serve.package import ModelPackage
from tests.serve.node.peers import cr_study

ALGORITHM = {"111001": "name", "111003": "version", "111002": "parameters"}  # TID 4019 concepts (DCM)
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment.value
FIELDS = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "CR"}
OLDER = {"name": "tiny-older", "version": 1, "sha256": "ab" * 32}
LONG_NAMED = {"name": "tiny-" + "x" * 70, "version": 12, "sha256": "ef" * 32}  # longer than an LO value holds


def _algorithms(items) -> list[dict]:
    """The TID 4019 algorithm identifications anywhere in a content tree, as {name, version, parameters}."""
    found = []
    for item in items:
        children = item.get("ContentSequence", [])
        named = [(ALGORITHM.get(child.ConceptNameCodeSequence[0].CodeValue), child.get("TextValue")) for child in children]
        if any(key == "name" for key, _ in named):
            entry = {key: text for key, text in named if key in ("name", "version")}
            found.append({**entry, "parameters": [text for key, text in named if key == "parameters"]})
        found += _algorithms(children)
    return found


def assert_names(ds: pydicom.Dataset, identity: dict) -> None:
    """The equipment attributes and the contributing equipment of `ds` name the package `identity`."""
    assert ds.Manufacturer == "MedTriage"
    assert ds.ManufacturerModelName == identity["name"][:64]
    assert ds.DeviceSerialNumber == identity["sha256"]
    assert f"{identity['name']} v{identity['version']}"[:64] in ds.SoftwareVersions
    (equipment,) = [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == "MedTriage"]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_EQUIPMENT
    assert (equipment.ManufacturerModelName, equipment.DeviceSerialNumber) == (identity["name"][:64], identity["sha256"])
    assert f"{identity['name']} v{identity['version']}, model.onnx sha256 {identity['sha256']}" in equipment.ContributionDescription


def assert_algorithms_name(sr: pydicom.Dataset, identity: dict) -> None:
    algorithms = _algorithms(sr.ContentSequence)
    assert algorithms  # one per measurement group and per measurement
    for algorithm in algorithms:
        assert (algorithm["name"], algorithm["version"]) == (identity["name"], str(identity["version"]))
        assert f"sha256={identity['sha256']}" in algorithm["parameters"]


def test_the_report_names_the_scoring_package_in_its_equipment_and_content_tree(predictor, tmp_path):
    (path,) = cr_study(tmp_path, 1, seed=11)
    scores = predictor.score_or_reject(path, path.name)
    sr = pydicom.dcmread(io.BytesIO(sr_bytes(path.read_bytes(), scores, predictor.package)))
    assert_names(sr, predictor.package.identity())
    assert_algorithms_name(sr, predictor.package.identity())


def test_dcmtk_reads_the_scoring_package_in_the_report(predictor, tmp_path, need_tool):
    dsrdump = need_tool("dsrdump", "apt-get install dcmtk")
    (path,) = cr_study(tmp_path, 1, seed=12)
    scores = predictor.score_or_reject(path, path.name)
    (tmp_path / "report.dcm").write_bytes(sr_bytes(path.read_bytes(), scores, predictor.package))
    dump = subprocess.run([dsrdump, "+Pl", "+Pc", str(tmp_path / "report.dcm")], capture_output=True, text=True, timeout=30, check=False)
    assert dump.returncode == 0 and not dump.stderr, dump.stderr
    package = predictor.package
    assert f"Manufacturer        : MedTriage ({package.name}, #{package.sha256})" in dump.stdout  # model name, serial number
    assert f'(111003,DCM,"Algorithm Version")="{package.version}"' in dump.stdout
    assert f'(111002,DCM,"Algorithm Parameters")="sha256={package.sha256}"' in dump.stdout


def _scored_by(score, identity: dict):
    return dataclasses.replace(score, model=identity["name"], version=identity["version"], sha256=identity["sha256"])


@pytest.mark.parametrize("identity", [OLDER, LONG_NAMED], ids=["older", "long-named"])
def test_a_report_names_the_package_that_scored_not_the_one_loaded_now(predictor, tmp_path, identity):
    (path,) = cr_study(tmp_path, 1, seed=13)
    scores = [_scored_by(score, identity) for score in predictor.score_file(path)]
    sr = pydicom.dcmread(io.BytesIO(sr_bytes(path.read_bytes(), scores, predictor.package)))
    assert_names(sr, identity)
    assert_algorithms_name(sr, identity)


@pytest.mark.parametrize("long_named", [False, True], ids=["named", "long-named"])
def test_the_heatmap_names_the_package_that_scored_the_image(predictor, tmp_path, long_named):
    if long_named:
        predictor = _serving(predictor, name=LONG_NAMED["name"])
    (path,) = cr_study(tmp_path, 1, seed=14)
    (score,) = predictor.score_file(path)
    heatmap = pydicom.dcmread(io.BytesIO(encoded(secondary_capture(predictor, path, score), "the heatmap", path.name)))
    identity = predictor.package.identity()
    assert_names(heatmap, identity)
    assert identity["sha256"] in heatmap.DerivationDescription


def test_no_heatmap_is_drawn_by_a_package_that_did_not_score_the_image(predictor, tmp_path):
    (path,) = cr_study(tmp_path, 1, seed=15)
    (score,) = predictor.score_file(path)
    with pytest.raises(MedTriageError, match=f"scored by {OLDER['name']} v1.*runs {predictor.package.name}"):
        secondary_capture(predictor, path, _scored_by(score, OLDER))


def _serving(predictor, **meta):
    """The predictor with its package's model.json changed by `meta`: a node restarted with another package."""
    changed = copy.copy(predictor)
    changed.package = ModelPackage(predictor.package.directory, {**predictor.package.meta, **meta})
    return changed


def test_a_study_scored_before_a_restart_is_reported_as_scored_and_gets_no_heatmap_from_the_new_package(predictor, tmp_path):
    (path,) = cr_study(tmp_path / "in", 1, seed=16)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store = NodeStore(tmp_path / "state")
    store.receive(path.read_bytes(), ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, FIELDS)
    assert Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=60).score_queued()
    time.sleep(0.01)
    newer = _serving(predictor, version=predictor.package.version + 1, sha256="cd" * 32)
    Worker(store, newer, ["PACS@127.0.0.1:1"], study_timeout=0, heatmaps=True).close_quiet_studies()
    kinds = store._execute("SELECT DISTINCT kind, file FROM deliveries WHERE study_uid = ?", (ds.StudyInstanceUID,))
    files = {row["kind"]: row["file"] for row in kinds}
    assert set(files) == {"sr"}  # the report goes; a picture of where another model looked does not
    sr = pydicom.dcmread(store.outbox_path(files["sr"]))
    assert_names(sr, predictor.package.identity())
    assert_algorithms_name(sr, predictor.package.identity())
    store.close()
