"""model.json's `input` and the graph's input must agree: a package whose graph has no input of model.json's name, or
takes other channels (or a fixed size where model.json declares any), is refused when it loads, not image by image; a graph that leaves its channels free and
refuses them when run gives a package error naming what it was fed, not an internal error."""

import json
import shutil
from pathlib import Path

import onnx
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.errors import PackageError
from medtriage.format import sha256_file
from medtriage.format.onnx_header import graph_header
from medtriage.serve.package import ModelPackage, load_package
from medtriage.serve.predictor import Predictor, Rejection

GRAYSCALE_MR = get_testdata_file("MR_small.dcm")


def with_meta(package: Path, **inputs) -> Path:
    """`package` with model.json's `input` changed (model.json is not covered by the package's digest)."""
    meta = json.loads((package / "model.json").read_text())
    meta["input"].update(inputs)
    (package / "model.json").write_text(json.dumps(meta))
    return package


def with_input_dims(package_dir: Path, target: Path, dims: dict) -> Path:
    """A copy of the package whose graph input has `dims` ({axis: size or name}); model.json's sha256 updated."""
    shutil.copytree(package_dir, target)
    model = onnx.load(target / "model.onnx")
    for axis, size in dims.items():
        dim = model.graph.input[0].type.tensor_type.shape.dim[axis]
        dim.ClearField("dim_param")
        if isinstance(size, int):
            dim.dim_value = size
        else:
            dim.dim_param = size
    onnx.save(model, target / "model.onnx")
    meta = json.loads((target / "model.json").read_text())
    meta["sha256"] = sha256_file(target / "model.onnx")
    (target / "model.json").write_text(json.dumps(meta))
    return target


def test_the_graph_input_shape_is_read_as_onnx_runtime_reports_it(package_dir, predictor):
    shape = graph_header(package_dir / "model.onnx")["inputs"]["pixels"]["shape"]
    assert shape == predictor.session.get_inputs()[0].shape == ["batch", 1, "height", "width"]


def test_model_json_channels_other_than_the_graph_takes_are_refused_at_load(package_copy):
    with pytest.raises(PackageError) as caught:
        load_package(with_meta(package_copy, channels=3))
    assert caught.value.where == str(package_copy)
    assert "channels=3" in caught.value.reason and "channels=1" in caught.value.reason and "re-export" in caught.value.hint


def test_score_stops_before_any_image_with_the_mismatch(package_copy, capsys):
    assert main(["score", str(with_meta(package_copy, channels=3)), GRAYSCALE_MR]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error:" in captured.err and "channels=3" in captured.err


def test_a_graph_of_fixed_size_is_refused_where_model_json_declares_any_size(package_dir, tmp_path):
    fixed = with_input_dims(package_dir, tmp_path / "fixed", {2: 32, 3: 32})
    with pytest.raises(PackageError, match="height='dynamic' for the input, model.onnx takes height=32 only"):
        load_package(fixed)
    assert load_package(with_meta(fixed, height=32, width=32)).channels == 1  # declared as the graph takes it


def test_a_predictor_over_a_package_built_in_memory_checks_the_graph_too(package_dir):
    meta = json.loads((package_dir / "model.json").read_text())
    meta["input"]["channels"] = 3
    with pytest.raises(PackageError, match="channels=3"):
        Predictor(ModelPackage(package_dir, meta), threads=1)


def test_a_graph_without_the_input_model_json_names_is_refused_at_load(package_copy):
    """Pixels are fed by model.json's `input.name`: a graph that takes them under another name would fail every image."""
    with pytest.raises(
        PackageError, match=r"model.json names the input 'image', which model.onnx does not take \(its inputs: 'pixels'\)"
    ) as err:
        load_package(with_meta(package_copy, name="image"))
    assert err.value.where == str(package_copy) and "re-export" in err.value.hint


def test_a_predictor_over_a_package_built_in_memory_checks_the_input_name_too(package_dir):
    meta = json.loads((package_dir / "model.json").read_text())
    meta["input"]["name"] = "image"
    with pytest.raises(PackageError, match="model.json names the input 'image'"):
        Predictor(ModelPackage(package_dir, meta), threads=1)


def test_a_graph_that_refuses_channels_it_leaves_free_rejects_the_image_as_a_package_error(package_dir, tmp_path):
    free = with_meta(with_input_dims(package_dir, tmp_path / "free", {1: "channels"}), channels=3)
    outcome = Predictor(load_package(free), threads=1).score_or_reject(GRAYSCALE_MR, "mr.dcm")
    assert isinstance(outcome, Rejection) and outcome.error == "PackageError"
    assert outcome.reason.startswith("ONNX Runtime could not score this image's [1, 3, 64, 64] float32 pixels")
    assert "model.json declares 3 channel(s)" in outcome.reason and "\n" not in outcome.reason
    assert load_package(free).describe() in outcome.hint and str(tmp_path) not in outcome.hint  # it may go to a client


def test_the_graph_header_reads_opset_inputs_and_outputs_as_onnx_runtime_and_onnx_do(package_dir, predictor):
    """One reader of what a graph says of itself serves both the load checks here and the export's model.json check."""
    header = graph_header(package_dir / "model.onnx")
    default = next(entry.version for entry in onnx.load(package_dir / "model.onnx").opset_import if entry.domain in ("", "ai.onnx"))
    session = predictor.session
    assert header == {
        "opset": default,
        "input": session.get_inputs()[0].shape,
        "output": session.get_outputs()[0].shape,
        "inputs": {i.name: {"shape": i.shape, "type": i.type} for i in session.get_inputs()},
        "outputs": {o.name: o.shape for o in session.get_outputs()},
    }
    assert graph_header(package_dir / "model.json") is None
