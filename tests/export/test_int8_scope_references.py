"""An int8 package's OOD threshold, drift references and operating points describe the int8 graph: each is refitted
on the int8 graph's outputs for the validation images, by the rule the fp32 export used (real quantisation of the
session's tiny package with an OOD output, scored through the served path)."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.export.quantize import quantize_package, served_outputs
from medtriage.format.references import psi
from medtriage.serve.npz import read_npz_split
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.export.tiny_package import NPZ, shared_safe_package

CALIBRATION_IMAGES = 64


@pytest.fixture(scope="module")
def int8_and_val(tmp_path_factory):
    """(int8 package, its probabilities of the positive label and OOD scores on the validation split, their labels)."""
    fp32_dir = shared_safe_package(tmp_path_factory)[0].package_dir
    int8 = load_package(quantize_package(fp32_dir, NPZ, tmp_path_factory.mktemp("int8") / "safe-int8", limit=CALIBRATION_IMAGES))
    pixels, labels = read_npz_split(NPZ, "val")
    predictor = Predictor(int8)
    probs, ood = served_outputs(predictor, [p[None] for p in pixels])
    return int8, probs[:, predictor.positive], ood, labels == predictor.positive


def test_ood_threshold_flags_on_the_int8_graph_what_model_json_says(int8_and_val):
    int8, _, ood, _ = int8_and_val
    block = int8.meta["ood"]
    flagged = float(np.mean(ood > int8.ood_threshold))
    assert block["val_flagged"] == pytest.approx(flagged)  # the share the card and serving promise
    assert int8.ood_threshold == pytest.approx(np.quantile(ood.astype(np.float64), 1 - block["false_alarm_rate"]), rel=1e-6)
    assert block["refit"]["graph"] == "int8" and block["refit"]["images"] == len(ood)


def test_drift_references_match_the_int8_graph_on_its_validation_images(int8_and_val):
    """Unshifted images read through the int8 graph must sit on its references, pooled and per site (the tiny
    package's validation sites alternate a, b), far below the PSI that raises an alarm."""
    int8, probability, ood, _ = int8_and_val
    drift = int8.meta["drift"]
    sites = np.array(["site-a", "site-b"])[np.arange(len(ood)) % 2]
    for name, values in (("probability", probability), ("ood_score", ood)):
        assert psi(drift["reference"]["all"][name], values) < 0.02
        for site, references in drift["reference"]["per_site"].items():
            assert psi(references[name], values[sites == site]) < 0.05
    assert sorted(drift["refit"]["features"]) == ["ood_score", "probability"] and drift["refit"]["graph"] == "int8"


def test_operating_points_meet_their_rules_on_the_int8_graph(int8_and_val):
    int8, probability, _, is_positive = int8_and_val
    thresholds = int8.meta["thresholds"]
    review, urgent = thresholds["review"], thresholds["urgent"]
    assert review["rule"] == "sensitivity" and urgent["rule"] == "specificity"
    assert np.mean(probability[is_positive] >= int8.review_threshold) >= review["target"]
    assert np.mean(probability[~is_positive] < int8.urgent_threshold) >= urgent["target"]
    assert thresholds["refit"]["graph"] == "int8"
