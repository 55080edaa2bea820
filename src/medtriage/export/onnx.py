"""One ONNX graph = preprocessing + network + temperature + softmax, and its parity with PyTorch.

The graph takes decoded pixels (float32 `[batch, channels, H, W]` in [0, 1], all three sizes
dynamic) and returns calibrated class probabilities, so serving needs no torch and no resize code.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from medtriage.errors import PackageError
from medtriage.model.networks import TriageNet

INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
log = logging.getLogger(__name__)
# The exporter's graph passes log every rewrite at INFO; a training run's log should show only ours.
for _chatty in ("onnx_ir", "onnxscript"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)
# It also warns, once per op, that torchvision's detection ops cannot be registered without torchvision: these nets
# use none of them, and the training install has no torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class CalibratedNet(nn.Module):
    """TriageNet logits / temperature -> softmax: the served model, as a torch module."""

    def __init__(self, net: TriageNet, temperature: float = 1.0):
        super().__init__()
        self.net = net
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(pixels) / self.temperature, dim=-1)


def export_onnx(model: CalibratedNet, path: str | Path, opset: int = 18) -> Path:
    """Write `model` as ONNX with dynamic batch/height/width (dynamo exporter) and check it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    size = model.net.preprocess.spec.size
    # The example must differ from the training size: otherwise the resize branch would be traced out.
    example = torch.rand(2, model.net.preprocess.spec.in_channels, size + 7, size + 11)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own deprecation inside the exporter (pytree's LeafSpec), nothing a caller can act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(getattr(model, "output_names", [OUTPUT_NAME])),
            dynamic_shapes={"pixels": dims},
            verbose=False,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def onnx_session(path: str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(path: str | Path, model: CalibratedNet, images: Iterable[np.ndarray]) -> tuple[float, int]:
    """Max |p_onnx - p_torch| over `images` (each `[C, H, W]`, sizes may differ); returns (diff, count)."""
    session, model = onnx_session(path), model.eval().cpu()
    worst, count = 0.0, 0
    for image in images:
        batch = np.ascontiguousarray(image[None], dtype=np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(batch))
        expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()  # a ScoredNet also returns its OOD score
        served = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        if not (np.isfinite(served).all() and np.isfinite(expected).all()):  # NaN would pass max() and the tolerance
            raise PackageError(
                f"the model returns NaN or infinite probabilities on validation image {count + 1}",
                where=path,
                hint="the training diverged (look for a NaN loss in the run's metrics): train again, e.g. with a lower trainer.lr",
            )
        worst, count = max(worst, float(np.abs(served - expected).max())), count + 1
    if count == 0:
        raise PackageError("no validation images for the parity check", hint="the pool's val split is empty")
    return worst, count


def check_parity(diff: float, tolerance: float, where: str | Path) -> None:
    if diff > tolerance:
        raise PackageError(
            f"ONNX and PyTorch disagree: max |p_onnx - p_torch| = {diff:.2e} > tolerance {tolerance:.0e}",
            where=where,
            hint="an operator exported differently; try another opset (export.opset) and report the network name",
        )
    log.info("parity ONNX vs PyTorch: max abs diff %.2e (tolerance %.0e)", diff, tolerance)
