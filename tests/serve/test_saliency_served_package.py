"""Occlusion maps through a real served package whose graph resizes like an exported one: the map lands on the
region the model reads in non-square images whatever the label order, the model is explained on the image it
scored, and NaN from the model is refused, not drawn as "no evidence"."""

import hashlib
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, save

from medtriage.errors import PackageError
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from medtriage.serve.saliency import explain_frame

SIDE = 32  # the probe graphs' input size, recorded in model.json as an export records it


def const(name, values, dtype=TensorProto.INT64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))


def patch(rows: tuple[int, int], cols: tuple[int, int]) -> list:
    """Nodes: `patch` = the rows x cols region (model coordinates) of the input resized in-graph to SIDE x SIDE,
    antialiased bilinear as exported graphs do, whatever the input's height and width."""
    return [
        helper.make_node("Shape", ["pixels"], ["shape"]),
        const("zero", [0]),
        const("two", [2]),
        const("side", [SIDE, SIDE]),
        helper.make_node("Slice", ["shape", "zero", "two", "zero"], ["batch_channels"]),
        helper.make_node("Concat", ["batch_channels", "side"], ["sizes"], axis=0),
        helper.make_node("Resize", ["pixels", "", "", "sizes"], ["resized"], mode="linear", antialias=1),
        const("starts", [rows[0], cols[0]]),
        const("ends", [rows[1], cols[1]]),
        const("hw", [2, 3]),
        helper.make_node("Slice", ["resized", "starts", "ends", "hw"], ["patch"]),
    ]


def mean_of(tensor: str) -> list:
    """Nodes: `mean` [B, 1] = the mean of `tensor` [B, C, h, w] per image."""
    return [
        const("chw", [1, 2, 3]),
        helper.make_node("ReduceMean", [tensor, "chw"], ["mean4"], keepdims=1),
        helper.make_node("Flatten", ["mean4"], ["mean"], axis=1),
    ]


def probabilities(logit: str, positive_first: bool) -> list:
    """Nodes: `probabilities` [B, 2] with p(positive) = sigmoid(`logit`), in the label order asked for."""
    order = ["positive", "negative"] if positive_first else ["negative", "positive"]
    return [
        const("one", [1.0], TensorProto.FLOAT),
        helper.make_node("Sigmoid", [logit], ["positive"]),
        helper.make_node("Sub", ["one", "positive"], ["negative"]),
        helper.make_node("Concat", order, ["probabilities"], axis=1),
    ]


def served(package_copy, nodes: list, positive_first: bool = False) -> Predictor:
    """The tiny package with `nodes` as its graph (dynamic height and width), its sha256 and labels to match."""
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(package_copy / "model.onnx"))
    meta = json.loads((package_copy / "model.json").read_text())
    meta["sha256"] = hashlib.sha256((package_copy / "model.onnx").read_bytes()).hexdigest()
    meta["preprocessing"]["resize"]["size"] = SIDE
    if positive_first:  # the positive label first: its probability is column 0, not 1
        meta["label_names"] = [meta["positive_label"], *(name for name in meta["label_names"] if name != meta["positive_label"])]
    (package_copy / "model.json").write_text(json.dumps(meta))
    return Predictor(load_package(package_copy), threads=1)


def brightness_probe(package_copy, rows, cols, positive_first=False) -> Predictor:
    """p(positive) = sigmoid(8 * (mean of one region - 0.5)): only that region matters."""
    logit = [const("half", [0.5], TensorProto.FLOAT), const("gain", [8.0], TensorProto.FLOAT)]
    logit += [helper.make_node("Sub", ["mean", "half"], ["centred"]), helper.make_node("Mul", ["centred", "gain"], ["logit"])]
    return served(package_copy, patch(rows, cols) + mean_of("patch") + logit + probabilities("logit", positive_first), positive_first)


def peak_fraction(saliency: np.ndarray) -> np.ndarray:
    """Where the map peaks, as a fraction of its height and width (pixel centres)."""
    return (np.array(np.unravel_index(np.argmax(saliency), saliency.shape)) + 0.5) / saliency.shape


def inside(fraction: np.ndarray, rows, cols) -> bool:
    return rows[0] / SIDE <= fraction[0] <= rows[1] / SIDE and cols[0] / SIDE <= fraction[1] <= cols[1] / SIDE


# frames taller than wide, wider than tall, and over the display side (shrunk for the picture, not for the model)
SHAPES = {"tall": (150, 60), "wide": (72, 200), "large": (700, 1100)}


@pytest.mark.parametrize("positive_first", [False, True], ids=["positive-second", "positive-first"])
@pytest.mark.parametrize("height, width", SHAPES.values(), ids=SHAPES.keys())
def test_the_map_peaks_on_the_off_centre_region_the_model_reads(package_copy, height, width, positive_first):
    rows, cols = (21, 27), (4, 10)  # lower left, in the model's coordinates
    predictor = brightness_probe(package_copy, rows, cols, positive_first)
    frame = np.random.default_rng(height).uniform(0.3, 0.6, (1, height, width)).astype(np.float32)
    frame[:, rows[0] * height // SIDE : rows[1] * height // SIDE, cols[0] * width // SIDE : cols[1] * width // SIDE] = 0.95

    result, _ = explain_frame(predictor, frame)

    assert inside(peak_fraction(result.map), rows, cols), f"peak at {peak_fraction(result.map)} of the map"
    assert abs(result.map.shape[0] / result.map.shape[1] - height / width) < 0.01  # the picture keeps the frame's shape
    assert result.baseline == pytest.approx(float(predictor.probabilities(frame[None])[0, predictor.positive]), abs=0.02)


def stripe_probe(package_copy, rows, cols) -> Predictor:
    """p(positive) = sigmoid(10 * (mean |difference of neighbouring columns| in one region - 0.25)): fine vertical
    stripes there, which any resize below the model's input size blurs away."""
    nodes = [const(name, values) for name, values in (("one_i", [1]), ("end", [SIDE]), ("minus_one", [-1]), ("w", [3]))]
    nodes += [
        helper.make_node("Slice", ["patch", "one_i", "end", "w"], ["right"]),
        helper.make_node("Slice", ["patch", "zero", "minus_one", "w"], ["left"]),
        helper.make_node("Sub", ["right", "left"], ["step"]),
        helper.make_node("Abs", ["step"], ["contrast"]),
    ]
    logit = [const("quarter", [0.25], TensorProto.FLOAT), const("gain", [10.0], TensorProto.FLOAT)]
    logit += [helper.make_node("Sub", ["mean", "quarter"], ["centred"]), helper.make_node("Mul", ["centred", "gain"], ["logit"])]
    return served(package_copy, patch(rows, cols) + nodes + mean_of("contrast") + logit + probabilities("logit", False))


def test_a_model_larger_than_the_picture_is_explained_on_the_image_it_scored(package_copy):
    rows, cols = (8, 20), (18, 30)
    predictor = stripe_probe(package_copy, rows, cols)
    frame = np.full((1, 48, SIDE), 0.5, np.float32)  # the graph halves nothing across columns: the stripes survive it
    frame[:, 12:30, 18:30] = np.where(np.arange(18, 30) % 2, 0.8, 0.2)
    score = float(predictor.probabilities(frame[None])[0, predictor.positive])

    result, _ = explain_frame(predictor, frame, max_side=16)  # a picture smaller than the model's input

    assert score > 0.9
    assert result.baseline == pytest.approx(score, abs=0.02)
    assert result.map.shape == (16, 11) and inside(peak_fraction(result.map), rows, cols)


def test_nan_from_the_model_is_refused_not_drawn_as_no_evidence(package_copy):
    """p = sigmoid(log(mean of a small region - 0.6)): finite on the image (region bright), NaN once a grey
    occlusion covers the region, as a reduced-precision graph can overflow on inputs unlike its training images."""
    rows, cols = (10, 13), (10, 13)  # inside one cell of the 7 x 7 grid
    logit = [const("floor", [0.6], TensorProto.FLOAT), helper.make_node("Sub", ["mean", "floor"], ["above"])]
    logit += [helper.make_node("Log", ["above"], ["logit"])]
    predictor = served(package_copy, patch(rows, cols) + mean_of("patch") + logit + probabilities("logit", False))
    frame = np.random.default_rng(0).uniform(0.3, 0.6, (1, 64, 64)).astype(np.float32)
    frame[:, 20:26, 20:26] = 0.95
    assert np.isfinite(predictor.probabilities(frame[None])).all()  # the image itself scores

    with pytest.raises(PackageError, match=r"NaN or infinite probability for 1 of its 49 occluded copies"):
        explain_frame(predictor, frame)
