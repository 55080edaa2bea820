import json

import numpy as np
import onnx
import pytest

from medtriage.errors import PackageError
from medtriage.export.onnx import check_parity
from medtriage.export.package import next_version
from medtriage.format import sha256_file
from medtriage.format.schema import schema_errors, validate_model_json


def test_package_holds_the_three_files_and_a_schema_valid_model_json(exported):
    result, _ = exported
    files = sorted(p.name for p in result.package_dir.iterdir())
    assert files == ["MODEL_CARD.md", "model.json", "model.onnx"]
    meta = json.loads((result.package_dir / "model.json").read_text())
    validate_model_json(meta)
    assert meta["sha256"] == sha256_file(result.package_dir / "model.onnx")
    assert meta["label_names"] == ["normal", "pneumonia"] and meta["positive_label"] == "pneumonia"


def test_onnx_graph_takes_pixels_of_any_size_and_returns_probabilities(exported):
    model = onnx.load(exported[0].package_dir / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert (graph_input.name, graph_output.name) == ("pixels", "probabilities")
    dims = graph_input.type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # batch, C fixed, H, W
    assert dims[1].dim_value == 1


def test_parity_calibration_and_thresholds_are_recorded(exported):
    meta = exported[0].meta
    assert meta["parity"]["images"] == 16
    assert 0 <= meta["parity"]["max_abs_diff"] <= meta["parity"]["tolerance"] == 1e-4
    cal = meta["calibration"]
    # Temperature is kept only where cross-validated ECE says it helps; either way the choice is recorded.
    cv = cal["selection"]["cv_ece"]
    assert (cal["method"] == "temperature") == (cv["temperature"] < cv["none"] - cal["selection"]["cv_gain_se"])
    assert 0.05 < cal["temperature"] < 20 if cal["method"] == "temperature" else cal["temperature"] == 1.0
    review, urgent = meta["thresholds"]["review"], meta["thresholds"]["urgent"]
    assert review["sensitivity"] >= 0.95 and urgent["specificity"] >= 0.95
    assert urgent["threshold"] >= review["threshold"]
    val = meta["metrics"]["val"]
    assert val["overall"]["sensitivity"] == pytest.approx(review["sensitivity"])
    assert set(val["per_site"]) == {"site-a", "site-b"}
    assert sum(m["n"] for m in val["per_site"].values()) == val["overall"]["n"] == 524


def test_model_card_states_use_limits_and_worst_site(exported):
    result, _ = exported
    card = (result.package_dir / "MODEL_CARD.md").read_text()
    per_site = result.meta["metrics"]["val"]["per_site"]
    worst = min(per_site, key=lambda site: per_site[site]["auc"])
    assert "not a diagnosis" in card
    assert f"Worst site on val: **{worst}**" in card
    assert "## Limitations" in card and result.meta["sha256"] in card


def test_model_card_says_what_the_package_refuses_to_score(exported):
    from medtriage.export.package import model_card

    meta = json.loads(json.dumps(exported[0].meta))
    meta.pop("scope", None), meta.pop("ood", None)
    unguarded = model_card(meta)
    assert "## What it refuses to score" in unguarded
    assert "**No declared scope**" in unguarded and "**No OOD score**" in unguarded
    meta["scope"] = {"modalities": ["CR", "DX"], "bits_stored": [8, 16], "body_parts": None, "source": "declared by export.modality (CR)"}
    meta["ood"] = {
        "threshold": 1.0842,
        "false_alarm_rate": 0.01,
        "val_flagged": 0.0102,
        "threshold_split": "out-of-fold",
        "method": "Mahalanobis",
    }
    guarded = model_card(meta)
    assert "outside its scope: modality CR, DX; bits stored (range) 8, 16 (declared by export.modality (CR))" in guarded
    assert "; body part" not in guarded  # an unset field checks nothing, so the card does not list it
    assert "OOD score above 1.084, which flags 1.0% of the out-of-fold images (Mahalanobis)" in guarded
    assert "No declared scope" not in guarded and "No OOD score" not in guarded


def test_schema_names_every_problem(exported):
    meta = json.loads(json.dumps(exported[0].meta))
    del meta["thresholds"]
    meta["version"] = "three"
    meta["sha256"] = "not-a-hash"
    errors = schema_errors(meta)
    assert any("missing 'thresholds'" in e for e in errors)
    assert any("$.version: expected integer" in e for e in errors)
    assert any("$.sha256" in e for e in errors)
    with pytest.raises(PackageError, match="does not follow the package schema"):
        validate_model_json(meta)


def test_parity_above_tolerance_fails_the_export(tmp_path):
    check_parity(5e-5, 1e-4, tmp_path)
    with pytest.raises(PackageError, match="ONNX and PyTorch disagree"):
        check_parity(3e-4, 1e-4, tmp_path)


def test_each_export_gets_the_next_version(tmp_path):
    assert next_version(tmp_path / "new") == 1
    (tmp_path / "model.json").write_text(json.dumps({"version": 4}))
    assert next_version(tmp_path) == 5


def test_served_probabilities_match_torch_on_validation_images(exported):
    """The package's own parity claim, re-checked through onnxruntime on a batch of mixed sizes."""
    import torch

    from medtriage.export.onnx import onnx_session

    result, model = exported
    rng = np.random.default_rng(0)
    batch = rng.random((3, 1, 45, 61), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    served = onnx_session(result.package_dir / "model.onnx").run(None, {"pixels": batch})[0]
    assert np.abs(served - expected).max() < 1e-4
    assert served.sum(axis=1) == pytest.approx(np.ones(3), abs=1e-5)
