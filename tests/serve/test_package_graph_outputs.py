"""The graph's outputs and input type must be what model.json says: the probabilities served are the output model.json
names (not whichever the graph lists first), and a graph whose class count or input type disagrees with model.json is
refused when the package loads (so that inspect, verify, bundling and the service's listing refuse it too), not image
by image."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from pydicom.data import get_testdata_file

from medtriage.errors import PackageError
from medtriage.format import sha256_file
from medtriage.serve.package import ModelPackage, load_package
from medtriage.serve.predictor import Predictor

GRAYSCALE_MR = get_testdata_file("MR_small.dcm")


def with_graph(package_dir: Path, target: Path, change) -> Path:
    """A copy of the package whose graph is `change(model)`d; model.json's sha256 updated."""
    shutil.copytree(package_dir, target)
    model = onnx.load(target / "model.onnx")
    change(model)
    onnx.save(model, target / "model.onnx")
    meta = json.loads((target / "model.json").read_text())
    meta["sha256"] = sha256_file(target / "model.onnx")
    (target / "model.json").write_text(json.dumps(meta))
    return target


def scaled_output_first(model) -> None:
    """A second output, the probabilities times 100 (as raw scores would be), listed before the probabilities."""
    graph = model.graph
    graph.initializer.append(helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0]))
    graph.node.append(helper.make_node("Mul", ["probabilities", "hundred"], ["scores"]))
    graph.output.insert(0, helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2]))


def half_precision_input(model) -> None:
    """The graph's input taken as float16 and cast to float32 inside it."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["pixels32" if name == "pixels" else name for name in node.input]
    graph.node.insert(0, helper.make_node("Cast", ["pixels"], ["pixels32"], to=TensorProto.FLOAT))
    graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16


def scaled_pixels(model, default: float | None = None) -> None:
    """The pixels multiplied inside the graph by a second input, 'scale' (with `default` as its initializer, if any)."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["scaled" if name == "pixels" else name for name in node.input]
    graph.node.insert(0, helper.make_node("Mul", ["pixels", "scale"], ["scaled"]))
    graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    if default is not None:
        graph.initializer.append(helper.make_tensor("scale", TensorProto.FLOAT, [], [default]))


def test_the_probabilities_served_are_the_output_model_json_names(package_dir, tmp_path):
    """Served by position, the scaled scores would be read as probabilities: every image URGENT, without a word."""
    package = load_package(with_graph(package_dir, tmp_path / "two", scaled_output_first))
    reference = Predictor(load_package(package_dir), threads=1).score_file(GRAYSCALE_MR)[0]
    score = Predictor(package, threads=1).score_file(GRAYSCALE_MR)[0]
    assert score.probability == pytest.approx(reference.probability) and score.priority == reference.priority


def with_meta(package: Path, change) -> Path:
    """`package` with `change(meta)` applied to its model.json (the digest covers model.onnx only)."""
    meta = json.loads((package / "model.json").read_text())
    change(meta)
    (package / "model.json").write_text(json.dumps(meta))
    return package


def renamed_output(meta) -> None:
    meta["output"]["name"] = "probs"


def three_classes(meta) -> None:
    meta["label_names"].append("effusion")
    meta["output"]["classes"] = 3


def test_a_graph_without_the_output_model_json_names_is_refused_at_load(package_copy):
    with pytest.raises(PackageError, match="model.json names the output 'probs', which model.onnx does not have") as err:
        load_package(with_meta(package_copy, renamed_output))
    assert "probabilities" in err.value.reason and "re-export" in err.value.hint


def test_a_graph_of_other_classes_than_model_json_declares_is_refused_at_load(package_copy):
    with pytest.raises(PackageError, match="model.json declares 3 classes, model.onnx returns 2") as err:
        load_package(with_meta(package_copy, three_classes))
    assert err.value.where == str(package_copy) and "re-export" in err.value.hint


def test_a_graph_that_takes_other_than_float32_pixels_is_refused_at_load(package_dir, tmp_path):
    half = with_graph(package_dir, tmp_path / "half", half_precision_input)
    with pytest.raises(PackageError, match=r"model.onnx takes tensor\(float16\) pixels, model.json declares float32") as err:
        load_package(half)
    assert err.value.where == str(half) and "re-export" in err.value.hint


def test_a_graph_without_the_ood_output_model_json_declares_is_refused_at_load(safe_package_dir, tmp_path):
    """Served, the unusual-input check would be off without a word."""
    copy = with_meta(Path(shutil.copytree(safe_package_dir, tmp_path / "safe")), lambda meta: meta["ood"].update(output="distance"))
    with pytest.raises(PackageError, match="model.json declares the OOD output 'distance', which model.onnx does not have") as err:
        load_package(copy)
    assert err.value.where == str(copy) and "re-export" in err.value.hint


@pytest.mark.parametrize("change, expected", [(renamed_output, "names the output 'probs'"), (three_classes, "declares 3 classes")])
def test_a_predictor_over_a_package_built_in_memory_checks_the_outputs_too(package_dir, change, expected):
    """Export builds packages in memory (int8 parity) that no load_package has checked."""
    meta = json.loads((package_dir / "model.json").read_text())
    change(meta)
    with pytest.raises(PackageError, match=expected):
        Predictor(ModelPackage(package_dir, meta), threads=1)


def test_loading_a_package_reads_the_graph_without_onnx_runtime(package_dir, monkeypatch):
    """The load checks read what model.onnx declares from its header: the graph is built once, when a predictor starts."""
    import onnxruntime

    def no_session(*args, **kwargs):
        raise AssertionError("load_package built an ONNX Runtime session")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    assert load_package(package_dir).output_name == "probabilities"


def test_a_batch_of_one_and_of_several_are_scored_alike(predictor):
    pixels = np.random.default_rng(0).random((3, 1, 40, 36), dtype=np.float32)
    together = predictor.probabilities(pixels)
    alone = np.concatenate([predictor.probabilities(pixels[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize(
    "output, expected",
    [("", r"\$\.ood\.output: '' is shorter than 1 character\(s\)"), ("probabilities", r"\$\.ood\.output 'probabilities' is output\.name")],
)
def test_an_ood_output_that_cannot_be_the_ood_score_is_refused_at_load(safe_package_dir, tmp_path, output, expected):
    """Blank, the OOD check would be off with no warning; the probabilities' own output, every image would fail."""
    copy = Path(shutil.copytree(safe_package_dir, tmp_path / "safe"))
    meta = json.loads((copy / "model.json").read_text())
    meta["ood"]["output"] = output
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=expected) as err:
        load_package(copy)
    assert err.value.where.endswith("model.json") and "re-export" in err.value.hint


def test_a_graph_that_needs_an_input_model_json_does_not_name_is_refused_at_load(package_dir, tmp_path):
    """Only model.json's `input.name` is fed: a graph that needs another input would fail every image."""
    two = with_graph(package_dir, tmp_path / "two", scaled_pixels)
    with pytest.raises(PackageError, match="model.onnx also needs the input 'scale', which model.json does not name") as err:
        load_package(two)
    assert err.value.where == str(two) and "re-export" in err.value.hint


def test_a_predictor_refuses_a_graph_that_needs_another_input_too(package_dir, tmp_path):
    """A package built in memory (int8 parity) is checked on its session's inputs."""
    two = with_graph(package_dir, tmp_path / "two", scaled_pixels)
    with pytest.raises(PackageError, match="also needs the input 'scale'"):
        Predictor(ModelPackage(two, json.loads((two / "model.json").read_text())), threads=1)


def test_a_further_input_with_a_default_is_not_needed_and_loads(package_dir, tmp_path):
    """An input backed by an initializer has a value when none is fed: the graph is served as it is."""
    defaulted = with_graph(package_dir, tmp_path / "defaulted", lambda model: scaled_pixels(model, default=1.0))
    reference = Predictor(load_package(package_dir), threads=1).score_file(GRAYSCALE_MR)[0]
    score = Predictor(load_package(defaulted), threads=1).score_file(GRAYSCALE_MR)[0]
    assert score.probability == pytest.approx(reference.probability)
