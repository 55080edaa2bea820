"""INT8 packages: real ONNX Runtime static quantisation of the session's tiny package, calibrated on real
validation images (npz split or DICOM files), checked through the served path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import ConfigError
from medtriage.export.quantize import quantize_package, served_probabilities
from medtriage.serve.npz import read_npz_split
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.export.tiny_package import NPZ, shared_safe_package, shared_tiny_package

CALIBRATION_IMAGES = 64


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory) -> Path:
    return shared_tiny_package(tmp_path_factory)[0].package_dir


@pytest.fixture(scope="module")
def int8_dir(fp32_dir, tmp_path_factory) -> Path:
    return quantize_package(fp32_dir, NPZ, tmp_path_factory.mktemp("int8") / "tiny-int8", limit=CALIBRATION_IMAGES)


def test_int8_package_is_its_own_verified_model_with_its_parity(fp32_dir, int8_dir):
    """Named apart from its source: the fp32 model's next version (from its registry) cannot collide with it."""
    fp32, int8 = load_package(fp32_dir), load_package(int8_dir)  # load_package checks schema and sha256
    assert int8.meta["precision"] == "int8" and int8.name == f"{fp32.name}-int8" and int8.version == fp32.version
    block = int8.meta["quantization"]
    assert block["source"] == fp32.identity() and "[val]" in block["calibration"]
    parity = block["parity"]
    assert parity["images"] == CALIBRATION_IMAGES and 0 < parity["max_abs_diff"] < 0.1
    assert abs(parity["auc_fp32"] - parity["auc_int8"]) < 0.02
    card = (int8_dir / "MODEL_CARD.md").read_text()
    assert "## Precision: int8" in card
    (torch_parity,) = [line for line in card.splitlines() if "ONNX vs PyTorch" in line]
    assert "of the fp32 source graph" in torch_parity  # measured on the source; the int8 graph's own is under Precision


def test_only_the_network_is_quantised(int8_dir):
    graph = onnx.load(str(int8_dir / "model.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producers[n.input[0]].op_type == "DequantizeLinear" for n in convs)
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= len(convs)
    resize = next(n for n in graph.node if n.op_type == "Resize")
    assert producers.get(resize.input[0]) is None or producers[resize.input[0]].op_type != "DequantizeLinear"
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_scores_held_out_images_like_fp32(fp32_dir, int8_dir):
    pixels, _ = read_npz_split(NPZ, "test")
    images = [p[None] for p in pixels[:128]]
    p32 = served_probabilities(Predictor(load_package(fp32_dir)), images)
    p8 = served_probabilities(Predictor(load_package(int8_dir)), images)
    assert np.abs(p8 - p32).max() < 0.1 and not np.array_equal(p8, p32)


def test_calibration_from_a_dicom_folder_skips_what_does_not_decode(fp32_dir, tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    out = quantize_package(fp32_dir, folder, tmp_path / "int8")
    block = load_package(out).meta["quantization"]
    assert block["calibration"] == "2 DICOM files from val/ (1 skipped: not decodable)" and "auc_int8" not in block["parity"]


def test_refits_from_a_dicom_folder_rest_on_every_file_not_only_the_calibration_images(tmp_path_factory, tmp_path):
    safe_dir = shared_safe_package(tmp_path_factory)[0].package_dir
    folder = tmp_path / "val"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    meta = load_package(quantize_package(safe_dir, folder, tmp_path / "int8", limit=1)).meta
    assert meta["quantization"]["calibration"] == "1 DICOM files from val/" and meta["quantization"]["parity"]["images"] == 1
    assert meta["ood"]["refit"]["graph"] == "int8" and meta["ood"]["refit"]["images"] == 2  # both that decode


def test_refuses_unknown_nodes_and_packages_already_int8(fp32_dir, int8_dir, tmp_path):
    with pytest.raises(ConfigError, match="no node named"):
        quantize_package(fp32_dir, NPZ, tmp_path / "x", limit=8, exclude=["no-such-node"])
    with pytest.raises(ConfigError, match="already int8"):
        quantize_package(int8_dir, NPZ, tmp_path / "y", limit=8)


def test_a_refused_quantisation_takes_no_version_number(fp32_dir, tmp_path):
    """Inputs it cannot use are refused before a version is taken: the int8 package stays at its source's version."""
    from medtriage.errors import InputError

    out = tmp_path / "models" / "tiny-int8"
    with pytest.raises(InputError, match="calibration images not found"):
        quantize_package(fp32_dir, tmp_path / "no-such.npz", out, limit=8)
    with pytest.raises(ConfigError, match="no node named"):
        quantize_package(fp32_dir, NPZ, out, limit=8, exclude=["no-such-node"])
    assert not (tmp_path / "models").exists()
    assert load_package(quantize_package(fp32_dir, NPZ, out, limit=8)).version == load_package(fp32_dir).version


def test_quantize_command_runs_without_torch(fp32_dir, tmp_path):
    code = (
        "import argparse, sys; from medtriage.export.quantize import register; parser = argparse.ArgumentParser(); "
        "register(parser.add_subparsers()); args = parser.parse_args(sys.argv[1:]); rc = args.func(args); "
        "print('heavy', [m for m in ('torch', 'monai', 'mlflow', 'hydra') if m in sys.modules]); sys.exit(rc)"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "quantize",
            str(fp32_dir),
            "--calibration",
            str(NPZ),
            "--images",
            "16",
            "--out",
            str(tmp_path / "int8"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("heavy []")
    assert json.loads((tmp_path / "int8" / "model.json").read_text())["precision"] == "int8"


def test_a_package_with_an_ood_output_keeps_it_and_reports_its_drift(tmp_path_factory, tmp_path):
    safe_dir = shared_safe_package(tmp_path_factory)[0].package_dir
    int8 = load_package(quantize_package(safe_dir, NPZ, tmp_path / "int8", limit=32))
    assert int8.ood_output and int8.meta["ood"]["refit"]["graph"] == "int8"  # its threshold set on its own scores
    assert int8.meta["ood"]["refit"]["fp32"]["threshold"] == load_package(safe_dir).ood_threshold
    parity = int8.meta["quantization"]["parity"]  # the OOD score comes from quantised features: its change is on record
    assert parity["ood_max_abs_diff"] > 0 and 0 <= parity["ood_flag_changes"] <= parity["images"]
    probs, ood = Predictor(int8).outputs(read_npz_split(NPZ, "test")[0][:4])
    assert probs.shape == (4, 2) and ood.shape == (4,)


def test_activations_stay_int8_between_convolutions_and_the_settings_are_on_record(int8_dir):
    block = load_package(int8_dir).meta["quantization"]
    assert block["settings"]["per_channel"] is True and block["settings"]["format"] == "QDQ"
    assert "per-channel" in block["method"]
    graph = onnx.load(str(int8_dir / "model.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    adds = [n for n in graph.node if n.op_type == "Add" and all(i in producers for i in n.input)]
    assert adds and all(producers[i].op_type == "DequantizeLinear" for n in adds for i in n.input)  # residual adds in int8
    # the 32 px tiny net ends on 2x2 and 1x1 maps: its last 3x3 convolutions lose the taps that read only padding
    trimmed = [n for n in graph.node if n.name in block["trimmed_convs"]]
    assert trimmed and all(list(next(a for a in n.attribute if a.name == "kernel_shape").ints) != [3, 3] for n in trimmed)


def test_per_tensor_weights_are_an_option(fp32_dir, tmp_path):
    int8 = load_package(quantize_package(fp32_dir, NPZ, tmp_path / "int8", limit=16, per_channel=False))
    block = int8.meta["quantization"]
    assert block["settings"]["per_channel"] is False and "per-tensor" in block["method"]
    graph = onnx.load(str(int8.onnx_path)).graph
    scales = {t.name: t for t in graph.initializer}
    weight_dq = [
        n
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in scales and scales[n.input[0]].data_type == onnx.TensorProto.INT8
    ]
    assert weight_dq and all(np.prod(scales[n.input[1]].dims, dtype=int) == 1 for n in weight_dq)


def test_quantising_again_into_the_same_folder_takes_the_next_version(fp32_dir, int8_dir, tmp_path):
    out = Path(shutil.copytree(int8_dir, tmp_path / "int8"))
    first = load_package(out)
    again = load_package(quantize_package(fp32_dir, NPZ, out, limit=8, per_channel=False))
    assert again.name == first.name and again.version == first.version + 1 and again.sha256 != first.sha256


def test_int8_scores_that_leave_no_operating_point_name_what_the_quantise_command_can_change(tmp_path):
    """A network that scores every image positive at 1.0: the urgent point (specificity 0.95, set on the export's
    validation scores) cannot be chosen again on its int8 scores of labelled calibration images, and the quantise
    command cannot change the export setting that asked for it."""
    import torch

    from medtriage.cli import build_parser
    from medtriage.errors import InputError
    from tests.export.test_export_refuses_what_the_package_cannot_say import export_small, small_net

    net = small_net()
    with torch.no_grad():
        net.backbone[-1].bias.copy_(torch.tensor([0.0, 1000.0]))
    package_dir = export_small(net, tmp_path).package_dir
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "val.npz", val_images=rng.integers(0, 256, (20, 16, 16), dtype=np.uint8), val_labels=np.arange(20)[:, None] % 2)
    args = build_parser().parse_args(
        ["quantize", str(package_dir), "--calibration", str(tmp_path / "val.npz"), "--out", str(tmp_path / "int8")]
    )
    with pytest.raises(InputError, match=r"on the int8 graph: no threshold in \[0, 1\] keeps specificity >= 0.95") as refused:
        args.func(args)
    assert refused.value.where == "--calibration"
    assert "--exclude" in refused.value.hint and "--calibration" in refused.value.hint
    assert "export the fp32 package again with another export.urgent_target" in refused.value.hint
    assert not (tmp_path / "int8").exists()
