"""What export writes for safety: a scope from the pool's real headers, calibration chosen on held-out folds,
drift references with a threshold that unshifted windows pass."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medtriage.evaluation.calibration import expected_calibration_error, probabilities
from medtriage.export.safety import choose_calibration, ece_with_interval, scope_from_rows
from medtriage.format import schema_errors
from medtriage.format.references import drift_block, psi
from medtriage.format.schema import MODEL_SCHEMA
from medtriage.io.dicom import read_dicom
from medtriage.serve.drift import DriftMonitor
from medtriage.serve.scope import first_failure, header_facts


@pytest.fixture(scope="module")
def site_pool(tmp_path_factory):
    from medtriage.data.pool import build_sites_pool
    from medtriage.data.simulate.sites import make_sites

    root = tmp_path_factory.mktemp("pool")
    make_sites(out_dir=root / "sites", limit=40, seed=1)
    return root / "sites", build_sites_pool(root / "sites", root / "pool", verbose=False)


def test_scope_comes_from_the_training_headers(site_pool):
    sites_dir, manifest = site_pool
    scope = scope_from_rows(manifest.split("train"), "CR")
    assert scope["modalities"] == ["CR", "DX"]
    assert scope["sop_classes"] == ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"]
    assert scope["photometric"] == ["MONOCHROME1", "MONOCHROME2"]
    assert (scope["body_parts"], scope["view_positions"], scope["channels"]) == (["CHEST"], ["AP"], [1])
    assert scope["bits_stored"] == [8, 16] and scope["min_rows"] == scope["min_columns"] == 64
    assert scope["pixel_spacing_mm"] == [pytest.approx(0.15 / 2), pytest.approx(0.3 * 2)]
    assert schema_errors(scope, MODEL_SCHEMA["properties"]["scope"]) == []
    for path in manifest.split("test")["path"]:
        assert first_failure(scope, header_facts(read_dicom(sites_dir / path))) is None
    assert first_failure(scope, header_facts(read_dicom(get_testdata_file("CT_small.dcm")))).field == "modality"


@pytest.mark.parametrize("declared, modalities", [("CR", ["CR", "DX"]), ("dx ", ["CR", "DX"]), ("SM", ["SM"])])
def test_an_npz_pool_is_scoped_to_its_declared_modality_alone(declared, modalities):
    import pandas as pd

    scope = scope_from_rows(pd.DataFrame({"site": ["a"], "channels": [1]}), declared)
    assert scope["modalities"] == modalities and set(scope) == {"modalities", "source"}
    assert schema_errors(scope, MODEL_SCHEMA["properties"]["scope"]) == []
    chest = header_facts(read_dicom(get_testdata_file("MR_small.dcm"))) | {"modality": "DX"}  # only the modality is checked
    assert (first_failure(scope, chest) is None) == ("DX" in modalities)
    assert first_failure(scope, header_facts(read_dicom(get_testdata_file("CT_small.dcm")))).field == "modality"


def test_temperature_is_kept_only_where_it_helps():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 2000)
    labels = (rng.random(2000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    calibrated = np.stack([-true_logit / 2, true_logit / 2], axis=1)  # softmax = the true probability
    assert choose_calibration(calibrated, labels, 15)["method"] == "none"
    overconfident = calibrated * 4
    chosen = choose_calibration(overconfident, labels, 15)
    assert chosen["method"] == "temperature" and 3 < chosen["temperature"] < 5
    assert chosen["selection"]["cv_ece"]["temperature"] < chosen["selection"]["cv_ece"]["none"]
    assert chosen["ece_after"] < chosen["ece_before"]
    assert choose_calibration(overconfident, labels, 15, allowed=False)["method"] == "none"


@pytest.mark.parametrize("positives", [2, 3])
def test_every_calibration_fold_fits_its_temperature_on_both_classes(positives):
    """A rare class of a few images is dealt over the folds: no fold's temperature is fitted on one class alone."""
    from medtriage.export.safety import stratified_folds

    labels = np.array([1] * positives + [0] * (40 - positives))
    fold_of = stratified_folds(labels, 5, seed=0)
    assert np.bincount(fold_of).tolist() == [8] * 5 and all(set(labels[fold_of != k]) == {0, 1} for k in range(5))
    logits = np.random.default_rng(0).normal(0, 1, (40, 2))
    for seed in range(10):  # shuffled without regard to class, some seeds put both positives in one fold
        assert choose_calibration(logits, labels, 15, seed=seed)["method"] in ("none", "temperature")


@pytest.mark.parametrize(("labels", "named"), [([1] + [0] * 39, "class 0: 39, class 1: 1"), ([0, 1, 0], "there are 3")])
def test_too_few_held_out_images_for_calibration_folds_are_refused_by_count(labels, named):
    from medtriage.errors import InputError

    logits = np.zeros((len(labels), 2))
    with pytest.raises(InputError, match="5-fold cross-validation needs") as refused:
        choose_calibration(logits, np.array(labels), 15)
    assert named in str(refused.value) and "data.limit" in str(refused.value)


def test_ece_interval_covers_the_estimate():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (500, 2))
    labels = rng.integers(0, 2, 500)
    result = ece_with_interval(probabilities(logits), labels, 15, resamples=200)
    assert result["ci"][0] <= result["ece"] <= result["ci"][1]
    assert result["ece"] == pytest.approx(expected_calibration_error(probabilities(logits), labels, 15))


def test_drift_references_and_threshold():
    rng = np.random.default_rng(2)
    values = rng.normal(0.5, 0.1, 600)
    sites = np.array(["a"] * 560 + ["b"] * 40)
    block = drift_block({"input_mean": values}, sites)
    assert schema_errors(block, MODEL_SCHEMA["properties"]["drift"]) == []
    assert set(block["reference"]["per_site"]) == {"a"}  # too few images for b's own histogram
    assert block["psi_threshold"] >= 0.25
    reference = block["reference"]["all"]["input_mean"]
    unshifted = [psi(reference, rng.normal(0.5, 0.1, 100)) for _ in range(200)]
    assert np.mean(np.array(unshifted) > block["psi_threshold"]) <= 0.03
    assert psi(reference, rng.normal(0.6, 0.1, 100)) > block["psi_threshold"]


def test_a_small_site_reference_has_its_own_threshold_and_keeps_the_false_alarm_rate():
    rng = np.random.default_rng(3)
    sites = np.array(["big"] * 1000 + ["small"] * 50)
    values = rng.normal(0.5, 0.1, len(sites))
    block = drift_block({"input_mean": values}, sites)
    assert schema_errors(block, MODEL_SCHEMA["properties"]["drift"]) == []
    thresholds = block["site_psi_thresholds"]
    assert set(thresholds) == {"big", "small"} and thresholds["small"] > block["psi_threshold"]
    small = block["reference"]["per_site"]["small"]["input_mean"]  # 50 images: noisier than the pooled 1050
    unshifted = np.array([psi(small, rng.normal(0.5, 0.1, 100)) for _ in range(1000)])
    assert np.mean(unshifted > block["psi_threshold"]) > 0.04  # the pooled threshold would alarm on this site
    assert np.mean(unshifted > thresholds["small"]) <= 0.02
    assert psi(small, rng.normal(0.7, 0.1, 100)) > thresholds["small"]  # and a marked shift still alarms
    monitor = DriftMonitor(block)
    for value in rng.normal(0.5, 0.1, 150):
        monitor.observe("small", {"input_mean": float(value)})
    (state,) = monitor.status()["sources"]
    assert (state["reference"], state["threshold"]) == ("small", thresholds["small"])


@pytest.mark.parametrize("missing", ["train", "val"])
def test_an_ood_fit_without_training_or_validation_images_says_which(missing):
    """A pool with an empty split gives the OOD fit no images: refused naming them, not an IndexError in the taps."""
    from medtriage.errors import InputError
    from medtriage.export.ood import OodData, fit_ood
    from medtriage.model.networks import PreprocessSpec, build_triage_net

    net = build_triage_net("resnet10", 2, PreprocessSpec(size=32)).eval()
    images = [np.random.default_rng(i).random((1, 32, 32), dtype=np.float32) for i in range(4)]
    train, labels, val = ([], np.array([], dtype=int), images) if missing == "train" else (images, np.array([0, 1, 0, 1]), [])
    with pytest.raises(InputError, match=f"0 {'training' if missing == 'train' else 'validation'} images") as err:
        fit_ood(net, 1.0, OodData(train, labels, val))
    assert err.value.where == "export.ood" and "export.ood=false" in err.value.hint
