"""A small, real model package for tests: exported once per test session, shared by export and serve tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
NPZ = ROOT / "data" / "samples" / "pneumoniamnist_28.npz"
_CACHE: dict = {}


def shared_tiny_package(tmp_path_factory):
    """(ExportResult, torch CalibratedNet), exported on first use in this session (read-only)."""
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = build_tiny_package(tmp_path_factory.mktemp("models"))
    return _CACHE["tiny"]


def shared_safe_package(tmp_path_factory):
    """The same model exported with its safety outputs: the in-graph OOD score, drift references and the
    test split's calibration (ExportResult, torch ScoredNet); exported on first use (read-only)."""
    if "safe" not in _CACHE:
        _CACHE["safe"] = build_tiny_package(tmp_path_factory.mktemp("models"), name="tiny-pneumonia-safe", safety=True)
    return _CACHE["safe"]


def linear_probe_net(size: int = 32):
    """A resnet10 whose random features get a logistic-regression head fitted on PneumoniaMNIST:
    a discriminative model (val AUC ~0.95) in seconds, where real training would take minutes."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from medtriage.data.sources.medmnist import read_npz
    from medtriage.model.networks import PreprocessSpec, build_triage_net

    torch.manual_seed(0)
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=size, in_channels=1, mean=0.5, std=0.25)).eval()
    images, labels = read_npz(NPZ)["train"]
    pick = np.random.default_rng(0).choice(len(labels), 1000, replace=False)
    head, net.backbone.fc = net.backbone.fc, torch.nn.Identity()
    with torch.no_grad():
        features = net(torch.from_numpy(images[pick, None].astype(np.float32) / 255)).numpy()
    probe = LogisticRegression(max_iter=2000).fit(features, labels[pick])
    # softmax([-z/2, z/2])[1] = sigmoid(z): two logits that reproduce the probe.
    head.weight.data = torch.tensor(np.stack([-probe.coef_[0], probe.coef_[0]]) / 2, dtype=torch.float32)
    head.bias.data = torch.tensor([-probe.intercept_[0], probe.intercept_[0]], dtype=torch.float32) / 2
    net.backbone.fc = head
    return net


def ood_data(val_pixels: list, train_images: int = 500):
    """The OOD score's fit: a random subset of the training images, and the validation images."""
    from medtriage.data.sources.medmnist import as_chw, read_npz
    from medtriage.export.ood import OodData

    images, labels = read_npz(NPZ)["train"]
    pick = np.random.default_rng(1).choice(len(labels), train_images, replace=False)
    return OodData([as_chw(image) for image in images[pick]], labels[pick], val_pixels)


def build_tiny_package(models_dir: Path, name: str = "tiny-pneumonia", size: int = 32, safety: bool = False):
    """(ExportResult, torch CalibratedNet) for a small model on PneumoniaMNIST validation images; with `safety`,
    (ExportResult, torch ScoredNet) of the package with an OOD output, drift references and test calibration."""
    import torch

    from medtriage.config.schema import ExportConfig
    from medtriage.data.sources.medmnist import PNEUMONIA_LABELS, as_chw, read_npz
    from medtriage.evaluation.predictions import Predictions
    from medtriage.export.onnx import CalibratedNet
    from medtriage.export.run import export_model

    net = linear_probe_net(size)
    images, labels = read_npz(NPZ)["val"]
    pixels = np.stack([as_chw(image) for image in images])
    with torch.no_grad():
        logits = net(torch.from_numpy(pixels)).numpy()
    sites = np.array(["site-a", "site-b"])[np.arange(len(labels)) % 2]
    cfg = ExportConfig(models_dir=str(models_dir), name=name, parity_images=16, log_to_mlflow=False, register_model=False)
    extra = {}
    if safety:
        test_images, test_labels = read_npz(NPZ)["test"]
        with torch.no_grad():
            test_logits = net(torch.from_numpy(np.stack([as_chw(image) for image in test_images]))).numpy()
        extra = {"ood_data": ood_data(list(pixels)), "test": Predictions(test_logits, test_labels, np.full(len(test_labels), "site-a"))}
    result = export_model(
        net,
        cfg,
        label_names=PNEUMONIA_LABELS,
        val=Predictions(logits, labels, sites),
        parity_images=list(pixels),
        training_sites=["site-a", "site-b"],
        network={"name": "resnet10"},
        **extra,
    )
    if safety:
        return result, result.served.eval()
    return result, CalibratedNet(net, result.meta["calibration"]["temperature"]).eval()


def write_unreadable_graph(package_dir: Path) -> Path:
    """Bytes that are no ONNX graph as the package's model.onnx, its sha256 recorded in model.json all the same (as an
    export would record a file copied over the graph before it was hashed); the path of model.onnx."""
    import hashlib
    import json

    onnx_path = Path(package_dir) / "model.onnx"
    onnx_path.write_bytes(b"not an ONNX graph\n" * 8)
    meta = json.loads((Path(package_dir) / "model.json").read_text())
    meta["sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (Path(package_dir) / "model.json").write_text(json.dumps(meta))
    return onnx_path
