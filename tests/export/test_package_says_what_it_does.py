"""model.json and the model card say what the graph does and what its figures rest on: whether a temperature is applied,
how many images set the OOD threshold and the drift references, which images the parity was measured on, and no NaN."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from medtriage.errors import PackageError
from medtriage.export.ood import OOD_NAME, OodData, fit_ood, ood_parity
from medtriage.export.package import model_card, write_package
from medtriage.format.references import drift_block
from medtriage.model.networks import PreprocessSpec, build_triage_net


def test_output_is_called_calibrated_only_when_the_graph_applies_a_temperature():
    from medtriage.export.run import output_spec

    labels = ["normal", "pneumonia"]
    assert output_spec(labels, {"method": "none", "temperature": 1.0})["calibrated"] is False
    assert output_spec(labels, {"method": "temperature", "temperature": 1.7})["calibrated"] is True


def test_the_card_does_not_call_unscaled_probabilities_calibrated(exported):
    meta = json.loads(json.dumps(exported[0].meta))
    meta["calibration"].update(method="none", temperature=1.0)
    card = model_card(meta)
    assert "calibrated with temperature" not in card and "calibrated probability" not in card
    assert "not temperature-scaled" in card
    meta["calibration"].update(method="temperature", temperature=1.5)
    assert "calibrated with temperature 1.500" in model_card(meta)


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return build_triage_net("resnet10", 2, PreprocessSpec(size=16, in_channels=1)).eval()


def test_an_ood_threshold_set_on_too_few_images_says_so(small_net):
    rng = np.random.default_rng(0)
    train = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(30)]
    val = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(20)]
    block = fit_ood(small_net, 1.0, OodData(train, np.arange(30) % 2, val), 0.01).block
    assert block["threshold_images"] == 20
    assert "20 validation images" in block["note"] and "100" in block["note"]


def test_drift_references_say_how_many_images_they_rest_on():
    rng = np.random.default_rng(0)
    block = drift_block({"probability": rng.random(60)}, np.array(["a"] * 50 + ["b"] * 10), min_images=20)
    assert block["reference"]["images"] == {"all": 60, "a": 50}


def _nan_ood_graph(path):
    """A graph whose OOD score of a blank image is 0/0 (NaN), as a distance scaled by a zero quantile would be."""
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, "height", "width"])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])
    ood = helper.make_tensor_value_info(OOD_NAME, TensorProto.FLOAT, ["batch"])
    nodes = [
        helper.make_node("ReduceMean", ["pixels", "axes"], ["mean"], keepdims=0),
        helper.make_node("Div", ["mean", "zero"], [OOD_NAME]),
        helper.make_node("Concat", ["mean2", "mean2"], ["probabilities"], axis=1),
        helper.make_node("Unsqueeze", ["mean", "one"], ["mean2"]),
    ]
    constants = [
        helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(nodes, "nan_ood", [pixels], [probs, ood], initializer=constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


class _NanOod(torch.nn.Module):
    def forward(self, pixels):
        mean = pixels.mean(dim=(1, 2, 3))
        return torch.stack([mean, mean], dim=1), mean / 0.0


def test_ood_parity_refuses_nan_scores_instead_of_passing_them(tmp_path):
    _nan_ood_graph(tmp_path / "model.onnx")
    with pytest.raises(PackageError, match="NaN or infinite OOD score") as err:
        ood_parity(tmp_path / "model.onnx", _NanOod(), [np.zeros((1, 8, 8), np.float32)])
    assert err.value.where and err.value.hint


def test_ood_parity_on_no_images_is_refused(tmp_path):
    _nan_ood_graph(tmp_path / "model.onnx")
    with pytest.raises(PackageError, match="no validation images"):
        ood_parity(tmp_path / "model.onnx", _NanOod(), [])


def test_nan_anywhere_in_model_json_is_refused_by_its_path(exported, tmp_path):
    result = exported[0]
    meta = json.loads(json.dumps(result.meta))
    meta["metrics"]["val"]["overall"]["auc"] = float("nan")  # a field the schema leaves free
    with pytest.raises(PackageError, match=r"metrics\.val\.overall\.auc") as err:
        write_package(tmp_path / meta["name"], result.package_dir / "model.onnx", meta)
    assert err.value.hint
    assert not (tmp_path / meta["name"]).exists()


def test_parity_images_are_spread_over_the_split_not_its_first_rows():
    from medtriage.export.run import spread

    rows = list(range(100))  # e.g. val sorted by site: the first rows are one site's
    picked = spread(rows, 5)
    assert picked == [0, 24, 49, 74, 99]
    assert spread(rows[:3], 5) == [0, 1, 2]


def test_an_ood_fit_given_images_for_other_members_says_where_and_what_to_do(small_net):
    one = OodData([], np.zeros(0, int), [])
    with pytest.raises(PackageError) as err:
        fit_ood(small_net, 1.0, OodData([], np.zeros(0, int), [], per_member=[one, one], holders=[[0], [1]]))
    assert err.value.where and err.value.hint
