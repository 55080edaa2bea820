"""A score says how it relates to the operating points, in the CLI table, the JSON and the DICOM SR."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.serve.dicom_results import TYPE2_COPIED, build_sr, encoded, read_header
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor

FILES = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb.dcm")]


def expected_decision(p: float, review: float, urgent: float | None) -> str:
    if urgent is not None and p >= urgent:
        return f"at or above urgent threshold {urgent:.3f}"
    return f"at or above review threshold {review:.3f}" if p >= review else f"below review threshold {review:.3f}"


def test_decision_matches_probability_and_thresholds(package_dir):
    predictor = Predictor(load_package(package_dir), threads=1)
    package = predictor.package
    for path in FILES:
        for score in predictor.score_file(path):
            assert score.decision == expected_decision(score.probability, package.review_threshold, package.urgent_threshold)
            below = score.probability < package.review_threshold
            assert below == (score.finding != package.positive_label) == (score.priority == "routine")


def test_table_and_sr_show_the_decision(package_dir, capsys):
    predictor = Predictor(load_package(package_dir), threads=1)
    (score,) = predictor.score_file(FILES[0])
    assert main(["score", str(package_dir), FILES[0]]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert score.decision in row
    sr = build_sr(read_header(FILES[0]), [score], predictor.package)
    meanings = {item.ConceptCodeSequence[0].CodeMeaning for item in _items(sr) if "ConceptCodeSequence" in item}
    assert score.decision in meanings


def _items(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def test_an_sr_is_built_for_a_source_without_patient_or_study_identifiers(package_dir):
    """Minimal or de-identified sources often leave out the Type 2 patient and study attributes the SR copies; the SR
    carries them empty (as the standard has it) instead of failing the study, and the source's header is left as it was."""
    predictor = Predictor(load_package(package_dir), threads=1)
    (score,) = predictor.score_file(FILES[0])
    header = read_header(FILES[0])
    for keyword in TYPE2_COPIED:
        if keyword in header:
            del header[keyword]
    sr = pydicom.dcmread(io.BytesIO(encoded(build_sr(header, [score], predictor.package), "the SR", "test")))
    assert all(keyword in sr and not str(sr[keyword].value or "") for keyword in TYPE2_COPIED)
    assert sr.StudyInstanceUID == header.StudyInstanceUID and "PatientID" not in header


def test_the_sr_calls_the_probability_calibrated_only_when_the_package_calibrates_it(package_dir, tmp_path):
    """Before, every SR said "Calibrated probability", whatever the package's calibration.method."""
    said = {}
    for method in ("temperature", "none"):
        copy = Path(shutil.copytree(package_dir, tmp_path / method))
        meta = json.loads((copy / "model.json").read_text())
        meta["calibration"]["method"], meta["output"]["calibrated"] = method, method != "none"
        (copy / "model.json").write_text(json.dumps(meta))
        predictor = Predictor(load_package(copy), threads=1)
        (score,) = predictor.score_file(FILES[0])
        sr = pydicom.dcmread(io.BytesIO(encoded(build_sr(read_header(FILES[0]), [score], predictor.package), "the SR", "test")))
        said[method] = [item.ConceptNameCodeSequence[0].CodeMeaning for item in _items(sr) if item.get("ValueType") == "NUM"]
    assert said == {"temperature": ["Calibrated probability of pneumonia"], "none": ["Probability of pneumonia"]}
