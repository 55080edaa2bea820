"""What a graph says of itself (opset, input channels, output classes, input and output shapes) is read by the reader serving checks a package
with, as the onnx library writes it."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from medtriage.export.onnx import graph_signature


def identity_graph(path, channels, classes, opsets) -> None:
    """A graph whose input and output dims are given (an int: fixed, a str: free), written with the onnx library."""
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", channels, "height", "width"])
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Mul", ["pixels", "weight"], ["probabilities"])], "g", [pixels], [probabilities], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets]), path)


@pytest.mark.parametrize(
    ("channels", "classes", "opsets", "expected"),
    [
        (
            3,
            5,
            [("com.microsoft", 1), ("", 19)],
            {"opset": 19, "channels": 3, "classes": 5, "input": ["batch", 3, "height", "width"], "output": ["batch", 5]},
        ),
        (
            "channels",
            "classes",
            [("ai.onnx", 18)],
            {
                "opset": 18,
                "channels": None,
                "classes": None,
                "input": ["batch", "channels", "height", "width"],
                "output": ["batch", "classes"],
            },
        ),
    ],
)
def test_the_signature_is_what_the_onnx_library_reads(tmp_path, channels, classes, opsets, expected):
    identity_graph(tmp_path / "model.onnx", channels, classes, opsets)
    assert graph_signature(tmp_path / "model.onnx") == expected
