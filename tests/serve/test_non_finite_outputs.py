"""A graph that returns NaN for an image (a numeric overflow, e.g. in a reduced-precision graph) gives a rejection
with its reason, never a score: a NaN probability would read as routine and a NaN OOD score would pass the
unusual-input check."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from medtriage.errors import PackageError
from medtriage.format import sha256_file
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection
from tests.serve.node.peers import cr_study


def with_nan_output(package_dir: Path, target: Path, output: str) -> Path:
    """A copy of the package whose graph multiplies `output` by NaN (model.json's sha256 updated to match)."""
    nan = helper.make_node("Constant", [], ["nan_value"], value=helper.make_tensor("nan_value", onnx.TensorProto.FLOAT, [], [np.nan]))
    return with_wrapped_output(package_dir, target, output, lambda inner: [nan, helper.make_node("Mul", [inner, "nan_value"], [output])])


def with_first_row_only(package_dir: Path, target: Path, output: str) -> Path:
    """A copy of the package whose graph returns `output` of the first image only, whatever the batch."""
    bounds = [helper.make_tensor(n, onnx.TensorProto.INT64, [1], [v]) for n, v in (("first", 0), ("second", 1), ("rows", 0))]
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in bounds]
    return with_wrapped_output(
        package_dir, target, output, lambda inner: [*constants, helper.make_node("Slice", [inner, "first", "second", "rows"], [output])]
    )


def with_wrapped_output(package_dir: Path, target: Path, output: str, nodes) -> Path:
    """A copy of the package whose graph passes `output` through `nodes(inner name)` (model.json's sha256 updated)."""
    shutil.copytree(package_dir, target)
    model = onnx.load(target / "model.onnx")
    inner = f"{output}_before_change"
    for node in model.graph.node:
        node.output[:] = [inner if name == output else name for name in node.output]
        node.input[:] = [inner if name == output else name for name in node.input]
    model.graph.node.extend(nodes(inner))
    onnx.save(model, target / "model.onnx")
    meta = json.loads((target / "model.json").read_text())
    meta["sha256"] = sha256_file(target / "model.onnx")
    (target / "model.json").write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return cr_study(tmp_path_factory.mktemp("nan-input"), 1, seed=3)[0]


@pytest.mark.parametrize("which", ["probabilities", "OOD score"])
def test_a_nan_output_is_a_rejection_not_a_score(safe_package_dir, image, tmp_path, which):
    meta = json.loads((safe_package_dir / "model.json").read_text())
    graph = onnx.load(safe_package_dir / "model.onnx").graph
    output = graph.output[0].name if which == "probabilities" else meta["ood"]["output"]
    for allow in (False, True):  # even --allow-out-of-scope, which scores unusual images with a mark
        predictor = Predictor(load_package(with_nan_output(safe_package_dir, tmp_path / f"{allow}", output)), threads=1)
        predictor.allow_out_of_scope = allow
        outcome = predictor.score_or_reject(image, image.name)
        assert isinstance(outcome, Rejection), outcome
        assert which in outcome.reason and "NaN" in outcome.reason and outcome.hint


def test_the_unchanged_package_scores_the_same_image(safe_predictor, image):
    (score,) = safe_predictor.score_file(image)
    assert np.isfinite(score.probability) and np.isfinite(score.ood_score)


def test_a_graph_that_returns_fewer_rows_than_images_scores_none_of_them(safe_package_dir, tmp_path):
    output = onnx.load(safe_package_dir / "model.onnx").graph.output[0].name
    predictor = Predictor(load_package(with_first_row_only(safe_package_dir, tmp_path / "cut", output)), threads=1)
    with pytest.raises(PackageError, match=r"shape \[1, 2\] and 3 OOD scores for 3 images of 2 classes"):
        predictor.outputs(np.zeros((3, predictor.package.channels, 64, 64), np.float32))
