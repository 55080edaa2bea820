"""A picture the served package cannot draw (its graph returns NaN for the occluded copies of a scored image) is
answered with what went wrong and what to do, as every refusal is, not as an internal error of the service."""

import numpy as np
import onnx
from fastapi.testclient import TestClient
from onnx import helper
from pydicom.data import get_testdata_file

from medtriage.serve.http import create_app
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.serve.test_non_finite_outputs import with_wrapped_output

GRAYSCALE_MR = get_testdata_file("MR_small.dcm")


def nan_for_batches(graph_input: str):
    """Nodes that multiply an output by NaN when more than one image is run at once: a single upload scores, the
    occlusion batch of its picture does not."""
    constants = {"first": [0], "second": [1], "one": [1]}
    made = [
        helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64, [1], value))
        for name, value in constants.items()
    ]
    made += [
        helper.make_node("Constant", [], ["nan"], value=helper.make_tensor("nan", onnx.TensorProto.FLOAT, [1], [np.nan])),
        helper.make_node("Constant", [], ["unit"], value=helper.make_tensor("unit", onnx.TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Shape", [graph_input], ["input_shape"]),
        helper.make_node("Slice", ["input_shape", "first", "second"], ["batch"]),
        helper.make_node("Greater", ["batch", "one"], ["several"]),
        helper.make_node("Where", ["several", "nan", "unit"], ["factor"]),
    ]
    return lambda inner, output: [*made, helper.make_node("Mul", [inner, "factor"], [output])]


def test_an_overlay_the_package_cannot_draw_is_a_422_with_the_reason(package_dir, tmp_path):
    graph = onnx.load(package_dir / "model.onnx").graph
    output, nodes = graph.output[0].name, nan_for_batches(graph.input[0].name)
    package = with_wrapped_output(package_dir, tmp_path / "nan-batches", output, lambda inner: nodes(inner, output))
    client = TestClient(create_app(Predictor(load_package(package), threads=1)))
    scored = client.post("/v1/score", files=[("files", ("mr.dcm", open(GRAYSCALE_MR, "rb").read(), "application/dicom"))])
    assert scored.status_code == 200, scored.json()
    (row,) = client.get("/v1/worklist").json()["entries"]
    answer = client.get(row["overlay"])
    assert answer.status_code == 422 and answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["reason"].startswith("no picture could be drawn: the model returned a NaN or infinite probability")
    assert "the score stands" in error["hint"]
