"""A chest X-ray package refuses what it was not made for, before inference, and names the field that failed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import PackageError
from medtriage.format import schema_errors
from medtriage.io.dicom import read_dicom
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection
from medtriage.serve.scope import first_failure, header_facts

CHEST_XRAY_SCOPE = {
    "modalities": ["CR", "DX"],
    "sop_classes": ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"],
    "photometric": ["MONOCHROME1", "MONOCHROME2"],
    "channels": [1],
    "body_parts": ["CHEST"],
    "view_positions": ["AP", "PA"],
    "bits_stored": [8, 16],
    "min_rows": 64,
    "min_columns": 64,
    "pixel_spacing_mm": [0.1, 0.4],
}
# pydicom's real files that a chest X-ray model must not score, and the field each one fails first.
FOREIGN = {
    "CT_small.dcm": "modality",
    "MR_small.dcm": "modality",
    "US1_UNCR.dcm": "modality",
    "rtdose.dcm": "modality",
    "SC_rgb.dcm": "modality",
}


def with_meta(package_dir: Path, target: Path, **changes) -> Path:
    """A copy of the package with model.json changed (its sha256 covers model.onnx only)."""
    shutil.copytree(package_dir, target)
    meta = json.loads((target / "model.json").read_text())
    meta.update(changes)
    (target / "model.json").write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="module")
def scoped_dir(safe_package_dir, tmp_path_factory) -> Path:
    return with_meta(safe_package_dir, tmp_path_factory.mktemp("scoped") / "chest", scope=CHEST_XRAY_SCOPE)


@pytest.fixture(scope="module")
def scoped(scoped_dir) -> Predictor:
    return Predictor(load_package(scoped_dir), threads=1)


@pytest.fixture(scope="module")
def site_files(tmp_path_factory) -> list[Path]:
    from medtriage.data.simulate.sites import make_sites

    out = tmp_path_factory.mktemp("sites")
    results = make_sites(out_dir=out, limit=12)
    strays = {name for r in results for name in r.stray_files}
    return sorted(p for p in out.rglob("*.dcm") if p.name not in strays)


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_modalities_are_refused_before_inference(scoped, name, monkeypatch):
    def no_inference(*args, **kwargs):
        raise AssertionError("the model ran on an out-of-scope image")

    monkeypatch.setattr(scoped, "outputs", no_inference)
    outcome = scoped.score_or_reject(get_testdata_file(name), name)
    assert isinstance(outcome, Rejection)
    assert (outcome.code, outcome.field, outcome.error) == ("out_of_scope", FOREIGN[name], "OutOfScopeError")
    assert outcome.as_dict()["code"] == "out_of_scope" and "modality" in outcome.reason


def test_the_simulated_sites_chest_xrays_are_in_scope(scoped, site_files):
    sites = {p.parent.name for p in site_files}
    assert len(sites) == 3
    for path in site_files:
        outcome = scoped.score_or_reject(path, path.name)
        assert not isinstance(outcome, Rejection), outcome
        assert outcome[0].flags == []


def test_allow_out_of_scope_scores_and_marks(scoped_dir):
    allowed = Predictor(load_package(scoped_dir), threads=1, allow_out_of_scope=True)
    scores = allowed.score_file(get_testdata_file("CT_small.dcm"))
    assert len(scores) == 1 and 0.0 <= scores[0].probability <= 1.0
    assert scores[0].flags[0] == "out_of_scope:modality"


def test_the_first_failing_field_is_named(site_files):
    image = read_dicom(site_files[0])
    facts = header_facts(image)
    assert first_failure(CHEST_XRAY_SCOPE, facts) is None
    cases = {
        "photometric": {**facts, "photometric": "RGB"},
        "body_part": {**facts, "body_part": "ABDOMEN"},
        "view_position": {**facts, "view_position": "LL"},
        "bits_stored": {**facts, "bits_stored": 32},
        "rows": {**facts, "rows": 32},
        "pixel_spacing": {**facts, "pixel_spacing": (0.05, 0.05)},
    }
    for field, changed in cases.items():
        assert first_failure(CHEST_XRAY_SCOPE, changed).field == field
    # Facts an image does not record are not held against it.
    assert first_failure(CHEST_XRAY_SCOPE, {**facts, "body_part": None, "pixel_spacing": None}) is None


def test_header_facts_come_from_the_file(site_files):
    image = read_dicom(site_files[0])
    assert image.body_part == "CHEST" and image.view_position == "AP"
    assert image.pixel_spacing is not None and 0.1 <= image.pixel_spacing[0] <= 0.3
    ct = header_facts(read_dicom(get_testdata_file("CT_small.dcm")))
    assert (ct["modality"], ct["sop_class"], ct["rows"], ct["channels"]) == ("CT", "1.2.840.10008.5.1.4.1.1.2", 128, 1)
    assert ct["pixel_spacing"] == pytest.approx((0.661468, 0.661468))


def test_a_package_without_scope_loads_with_a_warning(safe_package_dir, caplog):
    with caplog.at_level(logging.WARNING):
        predictor = Predictor(load_package(safe_package_dir), threads=1)
    assert predictor.package.scope is None
    assert "declares no scope" in caplog.text
    # No header check: a CT slice reaches the graph, where the content check still withholds its score.
    outcome = predictor.score_or_reject(get_testdata_file("CT_small.dcm"), "CT_small.dcm")
    assert isinstance(outcome, Rejection) and outcome.code == "unusual_input"


def test_the_schema_validates_the_scope_block(safe_package_dir, tmp_path):
    broken = with_meta(safe_package_dir, tmp_path / "broken", scope={**CHEST_XRAY_SCOPE, "modalities": "CR", "min_rows": 0})
    with pytest.raises(PackageError, match=r"scope\.modalities.*expected array"):
        load_package(broken)
    errors = schema_errors({"scope": {k: v for k, v in CHEST_XRAY_SCOPE.items() if k != "modalities"}})
    assert any("'modalities'" in e for e in errors)


def test_score_command_refuses_and_allows(scoped_dir, capsys):
    from medtriage.cli import main

    ct = get_testdata_file("CT_small.dcm")
    assert main(["score", str(scoped_dir), ct, "--json"]) == 1
    rejected = json.loads(capsys.readouterr().out)["rejected"]
    assert [(r["code"], r["field"]) for r in rejected] == [("out_of_scope", "modality")]
    assert main(["score", str(scoped_dir), ct, "--json", "--allow-out-of-scope"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert results[0]["flags"][0] == "out_of_scope:modality"


def test_http_refuses_with_the_field(scoped):
    from fastapi.testclient import TestClient

    from medtriage.serve.http import create_app

    client = TestClient(create_app(scoped))
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    response = client.post("/v1/score", files=[("files", ("MR_small.dcm", data, "application/dicom"))])
    assert response.status_code == 422
    rejected = response.json()["rejected"][0]
    assert (rejected["code"], rejected["field"]) == ("out_of_scope", "modality")
    assert "out of scope: modality" in rejected["reason"]


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # pydicom notes that 'cr' breaks the CS character rules
def test_scope_values_match_whatever_their_case_and_padding(package_dir, tmp_path):
    """Headers in the wild carry 'chest' or 'Chest', and a scope written from them may too: code strings are compared
    without regard to case or the spaces DICOM pads them with, so a chest film is not refused for its spelling."""
    film = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))  # a real chest CR, PA
    film.Modality, film.BodyPartExamined, film.ViewPosition = "cr", "Chest ", "pa"
    path = tmp_path / "film.dcm"
    film.save_as(path)
    spelled = {"modalities": [" Cr"], "photometric": ["Monochrome1"], "body_parts": ["chest"], "view_positions": ["Pa "]}
    predictor = Predictor(load_package(with_meta(package_dir, tmp_path / "spelled", scope=spelled)), threads=1)
    outcome = predictor.score_or_reject(path, path.name)
    assert not isinstance(outcome, Rejection), outcome
    assert first_failure(spelled, header_facts(read_dicom(path))) is None
    film.BodyPartExamined = "skull"  # another body part is still refused, whatever its case
    film.save_as(path)
    refused = predictor.score_or_reject(path, path.name)
    assert isinstance(refused, Rejection) and (refused.code, refused.field) == ("out_of_scope", "body_part")
