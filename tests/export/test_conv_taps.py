"""Trimming the kernel taps that only read padding: exact in ONNX Runtime, and only where shapes are known."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from medtriage.export.conv_taps import AxisCut, trim_padded_taps, used_taps


def conv_model(size: int | str, kernel: int, stride: int, pad: int, dilation: int = 1, channels: int = 3) -> onnx.ModelProto:
    """One Conv (with bias) on a `[batch, channels, size, size]` input; shapes inferred as the quantiser sees them."""
    rng = np.random.default_rng(kernel * 100 + stride * 10 + pad)
    weight = rng.normal(size=(4, channels, kernel, kernel)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    node = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["y"],
        name="conv",
        kernel_shape=[kernel, kernel],
        pads=[pad] * 4,
        strides=[stride, stride],
        dilations=[dilation, dilation],
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_taps_that_read_only_padding_are_found():
    assert used_taps(size=1, kernel=3, stride=1, pad_begin=1, pad_end=1) == AxisCut(1, 1, 0, 0)  # 3x3 on 1x1: the centre
    assert used_taps(size=2, kernel=3, stride=2, pad_begin=1, pad_end=1) == AxisCut(1, 2, 0, 1)
    assert used_taps(size=28, kernel=7, stride=2, pad_begin=3, pad_end=3) is None  # a stem reads pixels at every tap
    assert used_taps(size=1, kernel=1, stride=1, pad_begin=0, pad_end=0) is None


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad", "dilation"),
    [c for c in itertools.product([1, 2, 3, 5], [3, 5], [1, 2], [0, 1, 2], [1, 2]) if c[0] + 2 * c[3] >= c[4] * (c[1] - 1) + 1],
)
def test_trimmed_convolution_gives_the_same_output(size, kernel, stride, pad, dilation):
    model = conv_model(size, kernel, stride, pad, dilation)
    x = np.random.default_rng(size).normal(size=(2, 3, size, size)).astype(np.float32)
    expected = run(model, x)
    trimmed = trim_padded_taps(model)
    got = run(model, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    kernel_shape = next(a for a in model.graph.node[0].attribute if a.name == "kernel_shape").ints
    weight_shape = numpy_helper.to_array(model.graph.initializer[0]).shape
    assert list(weight_shape[2:]) == list(kernel_shape)
    assert (trimmed == ["conv"]) == (list(kernel_shape) != [kernel, kernel])


def test_padding_only_taps_are_cut_from_a_small_feature_map():
    model = conv_model(1, 3, 1, 1)
    assert trim_padded_taps(model) == ["conv"]
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (4, 3, 1, 1)


def test_a_convolution_of_unknown_input_size_is_left_alone():
    model = conv_model("height", 3, 1, 1)
    assert trim_padded_taps(model) == []
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (4, 3, 3, 3)
