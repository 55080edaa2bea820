"""The ONNX parity check refuses a model whose probabilities are NaN (a diverged training): NaN differences would
otherwise pass both the running maximum and the tolerance, and the package would be written."""

import pytest
import torch

from medtriage.errors import PackageError
from medtriage.export.onnx import CalibratedNet, export_onnx, parity
from medtriage.model.networks import PreprocessSpec, build_triage_net


def test_a_diverged_model_fails_parity_instead_of_passing_it(tmp_path):
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=32)).eval()
    images = [torch.rand(1, 32, 32).numpy() for _ in range(2)]
    healthy = tmp_path / "healthy.onnx"
    export_onnx(CalibratedNet(net, 1.0), healthy)
    assert parity(healthy, CalibratedNet(net, 1.0), images)[1] == 2
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.fill_(float("nan"))  # what a training that diverged leaves
    diverged = tmp_path / "diverged.onnx"
    export_onnx(CalibratedNet(net, 1.0), diverged)
    with pytest.raises(PackageError, match="NaN or infinite probabilities on validation image 1"):
        parity(diverged, CalibratedNet(net, 1.0), images)
