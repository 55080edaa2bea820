"""INT8 model packages: ONNX Runtime static quantisation (QDQ) of a package, calibrated on validation images.

The package graph is preprocessing (resize, intensity normalisation) + network + calibration
(temperature, softmax). The network's Conv, MatMul and Gemm nodes get int8 weights (per channel unless
asked otherwise) and uint8 activations, with ranges observed on the calibration images; the residual
Adds, ReLUs and pooling between them are quantised too, so activations stay int8 from one convolution
to the next instead of going back to float at every block. The resize, the normalisation and the
softmax stay float, so pixels enter and probabilities leave exactly as in fp32. Before quantising, the
graph goes through the pre-processing ONNX Runtime recommends (shape inference, basic optimisations), and
convolutions whose kernels only read padding at some taps are cut to the taps that read pixels (see
conv_taps; exact in float). `exclude` keeps named nodes float where int8 hurts. The result is a package of
its own model, `<name>-int8`, with `precision: int8` and a `quantization` block: its source, its settings,
the calibration images and the parity of its served probabilities against the fp32 package on those images.
What serving compares the graph's outputs with is refitted on the int8 graph's outputs for the same (validation)
images, so that they mean for int8 what they say: the OOD threshold, the drift references of the probability and
the OOD score, and (labelled images only) the review/urgent operating points.
Its own name keeps (name, version) one package: the fp32 model's next version comes from its registry, which
knows nothing of int8 packages, and a worklist row or SR says which of the two scored it.

Torch-free: onnx + onnxruntime.quantization (onnx comes with medtriage[train]).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medtriage.arguments import path as path_argument  # `path` names a file in this module's loops
from medtriage.arguments import positive_int, refuse_file_as_folder
from medtriage.errors import ConfigError, InputError, MedTriageError
from medtriage.export.int8_refit import Outputs, refit_on_int8
from medtriage.format import META_FILE, ONNX_FILE

log = logging.getLogger(__name__)
INT8_SUFFIX = "-int8"
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")  # the nodes with int8 weights
# ...and the nodes between them that keep activations int8 (a float round trip at each would cost more)
QUANTIZED_OPS = (*WEIGHTED_OPS, "Add", "Relu", "MaxPool", "GlobalAveragePool")
DEFAULT_IMAGES = 256
CALIBRATION_BATCH = 16


def calibration_images(
    source: str | Path, channels: int, split: str = "val", limit: int | None = DEFAULT_IMAGES
) -> tuple[list[np.ndarray], np.ndarray | None, str]:
    """Images `[1, C, H, W]` (model channels, float32 in [0, 1]) from a MedMNIST-layout npz split or a folder
    of DICOM files (first frame of each; files that do not decode are skipped and counted), with the npz
    labels (None for DICOM), and a description of where they came from. `limit=None`: all of them."""
    from medtriage.serve.predictor import to_model_channels

    if limit is not None and limit < 1:  # no image to observe ranges on: onnxruntime would fail deep inside, with no word on why
        raise ConfigError(f"{limit} calibration images asked for", where="--images", hint=f"use at least 1 (default {DEFAULT_IMAGES})")
    source = Path(source)
    if source.is_file() and source.suffix == ".npz":
        from medtriage.serve.npz import read_npz_split

        pixels, labels = read_npz_split(source, split)
        pixels, labels = pixels[:limit], labels[:limit]
        images = [to_model_channels(p[None], channels, str(source)) for p in pixels]
        if not images:
            raise InputError(f"the {split} split holds no images to calibrate on", where=source, hint="choose another --split")
        return images, labels, f"{source.name} [{split}], first {len(images)} images"
    if source.is_file():
        raise InputError(
            "calibration file is not an .npz",
            where=source,
            hint="pass a MedMNIST-layout .npz (its --split is used) or a folder of validation DICOM files",
        )
    if not source.is_dir():
        raise InputError(
            "calibration images not found",
            where=source,
            hint="pass a MedMNIST-layout .npz (its --split is used) or a folder of validation DICOM files",
        )
    images, skipped = _dicom_images(source, channels, limit)
    if not images:
        raise InputError(
            f"no DICOM file in the folder decoded ({skipped} skipped)",
            where=source,
            hint="pass a folder of validation DICOM files, or a MedMNIST-layout .npz (its --split is used)",
        )
    return images, None, f"{len(images)} DICOM files from {source.name}/" + (f" ({skipped} skipped: not decodable)" if skipped else "")


def _dicom_images(folder: Path, channels: int, limit: int | None) -> tuple[list[np.ndarray], int]:
    images, skipped = [], 0
    for image in _decoded_dicoms(folder, channels):
        if limit is not None and len(images) >= limit:
            break
        if image is None:
            skipped += 1
        else:
            images.append(image)
    return images, skipped


def _decoded_dicoms(folder: Path, channels: int) -> Iterator[np.ndarray | None]:
    """The first frame of each file under `folder` as a `[1, C, H, W]` model input, one at a time; None for a file
    that does not decode (logged)."""
    from medtriage.io.dicom import read_dicom
    from medtriage.serve.predictor import to_model_channels

    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            yield to_model_channels(read_dicom(path).pixels[:1], channels, str(path))
        except MedTriageError as err:
            log.info("calibration: skipped %s (%s)", path, err.reason)
            yield None


def refit_outputs(source: str | Path, channels: int, split: str, fp32, int8) -> tuple[Outputs, Outputs, np.ndarray | None]:
    """Both graphs' outputs on the validation images the int8 refits rest on, and their labels: a whole npz split, or
    every file of a DICOM folder that decodes (the thresholds' rules need all the images the fp32 export used: a subset
    moves them by chance more than int8 does). A folder's images are decoded and scored one at a time, so --images
    bounds the calibration's memory, not the refits' images."""
    if Path(source).is_file():
        images, labels, _ = calibration_images(source, channels, split, limit=None)
        return served_outputs(fp32, images), served_outputs(int8, images), labels
    pairs = [(fp32.outputs(image), int8.outputs(image)) for image in _decoded_dicoms(Path(source), channels) if image is not None]
    return _joined([a for a, _ in pairs]), _joined([b for _, b in pairs]), None


def _joined(outputs: list[Outputs]) -> Outputs:
    ood = [scores for _, scores in outputs]
    return np.concatenate([probs for probs, _ in outputs]), None if None in ood else np.concatenate(ood)


def quantize_onnx(
    source: Path, target: Path, images: list[np.ndarray], input_name: str, exclude: Sequence[str] = (), per_channel: bool = True
) -> dict:
    """Write the QDQ int8 model of `source` to `target`; returns what was done: the quantised nodes with
    weights (`quantized_nodes`), the convolutions cut to the taps that read pixels (`trimmed_convs`)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    check_excluded(source, exclude)

    class Reader(CalibrationDataReader):
        def __init__(self):  # same-size images in batches: fewer calibration runs, same observed ranges
            self.batches = iter(batch for _, batch in _batches(images))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        trimmed = prepare_graph(source, prepared)
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,  # u8 x s8: the fast integer GEMM on x86 (VNNI where present)
            per_channel=per_channel,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=list(exclude),
            calibrate_method=CalibrationMethod.MinMax,
        )
    graph = onnx.load(str(target)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    weighted = sorted(
        n.name for n in graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and producers.get(n.input[1]) == "DequantizeLinear"
    )
    return {"quantized_nodes": weighted, "trimmed_convs": trimmed}


def check_excluded(source: Path, exclude: Sequence[str]) -> None:
    """Refuse names in `exclude` that are no node of the graph at `source`."""
    import onnx

    nodes = {n.name: n.op_type for n in onnx.load(str(source), load_external_data=False).graph.node}
    unknown = sorted(set(exclude) - set(nodes))
    if unknown:
        raise ConfigError(
            f"no node named {', '.join(unknown)} in the graph",
            where="--exclude",
            hint=f"quantisable nodes: {', '.join(n for n, op in nodes.items() if op in QUANTIZED_OPS)}",
        )


def prepare_graph(source: Path, target: Path) -> list[str]:
    """Write to `target` the float graph that gets quantised; returns the convolutions trimmed on the way.

    The pre-processing ONNX Runtime recommends before quantising: shapes inferred (by onnx, with data
    propagation; `onnxruntime.tools` would import torch wherever it is installed), padded taps trimmed where
    the shapes are now known, then ONNX Runtime's basic graph optimisations (constant folding, redundant
    nodes removed). Numerically the same float model as `source`."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    from medtriage.export.conv_taps import trim_padded_taps

    model = onnx.shape_inference.infer_shapes(onnx.load(str(source)), data_prop=True)
    trimmed = trim_padded_taps(model)
    add_pre_process_metadata(model)  # what quant_pre_process marks: quantize_static then knows it was done
    shaped = target.with_name(f"shaped-{target.name}")
    onnx.save(model, str(shaped))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(shaped), options, providers=["CPUExecutionProvider"])
    return trimmed


def _batches(images: list[np.ndarray]) -> list[tuple[list[int], np.ndarray]]:
    """(positions, stacked images) of same-size images, at most CALIBRATION_BATCH per stack."""
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape[1:], []).append(i)
    return [
        (group[i : i + CALIBRATION_BATCH], np.concatenate([images[j] for j in group[i : i + CALIBRATION_BATCH]]))
        for group in by_shape.values()
        for i in range(0, len(group), CALIBRATION_BATCH)
    ]


def served_probabilities(predictor, images: list[np.ndarray]) -> np.ndarray:
    """`[N, K]` probabilities of `images` through a Predictor, in the order of `images`."""
    return served_outputs(predictor, images)[0]


def served_outputs(predictor, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities `[N, K]` and OOD scores `[N]` (None without an OOD output) of `images`, in their order."""
    probs = np.zeros((len(images), len(predictor.package.label_names)), dtype=np.float32)
    ood = None
    for positions, batch in _batches(images):
        probs[positions], scores = predictor.outputs(batch)
        if scores is not None:
            ood = np.zeros(len(images), dtype=np.float32) if ood is None else ood
            ood[positions] = scores
    return probs, ood


def parity_report(fp32, int8, images: list[np.ndarray], labels: np.ndarray | None) -> dict:
    """How the int8 package's served probabilities differ from the fp32 one's on `images` (two Predictors):
    max and mean |dp| of the positive class, priorities that change, and the AUC of each where labels exist."""
    (p32, ood32), (p8, ood8) = served_outputs(fp32, images), served_outputs(int8, images)
    diff = np.abs(p8[:, fp32.positive] - p32[:, fp32.positive])
    changed = sum(fp32.priority(float(a)) != int8.priority(float(b)) for a, b in zip(p32[:, fp32.positive], p8[:, int8.positive]))
    report = {
        "images": len(images),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "priority_changes": int(changed),
        "runtime": "onnxruntime CPU (the served path)",
    }
    threshold32, threshold8 = fp32.package.ood_threshold, int8.package.ood_threshold
    if ood32 is not None and ood8 is not None:  # the OOD score comes from the quantised features too
        report["ood_max_abs_diff"] = float(np.abs(ood8 - ood32).max())
        if threshold32 is not None and threshold8 is not None:  # each flags at its own threshold, as served
            report["ood_flag_changes"] = int(((ood32 > threshold32) != (ood8 > threshold8)).sum())
    if labels is not None:
        from medtriage.evaluation.metrics import auc

        report.update(auc_fp32=auc(labels, p32), auc_int8=auc(labels, p8))
    return report


def quantize_package(
    package_dir: str | Path,
    calibration: str | Path,
    out: str | Path | None = None,
    split: str = "val",
    limit: int = DEFAULT_IMAGES,
    exclude: Sequence[str] = (),
    per_channel: bool = True,
) -> Path:
    """Write the int8 form of the package at `package_dir` to `out` (default: `<package_dir>-int8`) as model
    `<name>-int8`, at the source's version unless `out` already holds that version or a later one (then one more:
    a version is never reused); `per_channel=False` gives each weight tensor one scale instead of one per output
    channel."""
    from medtriage.export.package import next_version, write_package
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor

    refuse_file_as_folder(out, "--out")  # before any work, not after it
    package = load_package(package_dir)
    if package.meta.get("precision", "fp32") != "fp32":
        raise ConfigError(
            f"{package.describe(with_sha=False)} is already {package.meta['precision']}",
            where=package_dir,
            hint="quantise the fp32 package it was made from",
        )
    out = Path(out) if out else package.directory.with_name(f"{package.directory.name}{INT8_SUFFIX}")
    if out.resolve() == package.directory.resolve():
        raise ConfigError("--out would overwrite the fp32 package", where=out, hint="choose another folder")
    images, labels, described = calibration_images(calibration, package.channels, split, limit)
    check_excluded(package.onnx_path, exclude)
    # Only then a number is taken: one taken by a refused run is never given again, and the int8 package would no
    # longer be at its source's version.
    version = max(package.version, next_version(out))
    fp32 = Predictor(package)
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / ONNX_FILE
        done = quantize_onnx(package.onnx_path, quantized, images, fp32.input_name, exclude, per_channel)
        meta = {**package.meta, "name": f"{package.name}{INT8_SUFFIX}", "version": version, "precision": "int8"}
        outputs32, outputs8, refit_labels = refit_outputs(calibration, package.channels, split, fp32, _unwritten(quantized, meta, out))
        meta = refit_on_int8(meta, fp32.positive, outputs32, outputs8, refit_labels, split)
        quantization = {
            "method": f"onnxruntime static quantisation, QDQ, {_granularity(per_channel)} int8 weights, uint8 activations (MinMax)",
            "source": package.identity(),
            "calibration": described,
            "settings": {
                "format": "QDQ",
                "weights": "int8",
                "activations": "uint8",
                "per_channel": per_channel,
                "reduce_range": False,
                "calibration_method": "MinMax",
                "preprocessing": "shape inference, padded convolution taps trimmed, onnxruntime basic optimisations",
            },
            "quantized_ops": list(QUANTIZED_OPS),
            "quantized_nodes": len(done["quantized_nodes"]),
            "trimmed_convs": done["trimmed_convs"],
            "excluded_nodes": list(exclude),
            "parity": parity_report(fp32, _unwritten(quantized, meta, out), images, labels),  # priorities meet the refitted values
            "note": "metrics and calibration were measured on the fp32 source model, parity says how far int8 moves them; "
            "what serving compares int8 outputs with (OOD threshold, drift references, operating points) says under "
            "`refit` whether it was refitted on the int8 graph",
        }
        meta = write_package(out, quantized, {**meta, "quantization": quantization})
    report = quantization["parity"]
    log.info(
        "int8 package %s v%s written to %s (max |dp| %.4f on %d calibration images)",
        meta["name"],
        meta["version"],
        out,
        report["max_abs_diff"],
        report["images"],
    )
    return out


def _unwritten(onnx_path: Path, meta: dict, package_dir: Path):
    """A Predictor on the int8 graph where it lies, with `meta` as the package will hold it: the refits and the parity
    need one before the package is written, and it is written once, with their results. A refusal of `meta` names
    its place in the package to be written at `package_dir`, not the temporary folder the graph lies in."""
    from medtriage.export.package import completed_meta
    from medtriage.serve.package import ModelPackage
    from medtriage.serve.predictor import Predictor

    return Predictor(ModelPackage(onnx_path.parent, completed_meta(onnx_path, meta, where=package_dir / META_FILE)))


def _granularity(per_channel: bool) -> str:
    return "per-channel" if per_channel else "per-tensor"


def register(subparsers) -> None:
    quantize = subparsers.add_parser(
        "quantize",
        help="write the int8 form of a model package (ONNX Runtime static quantisation)",
        description="Quantise a package's network to int8 (QDQ), calibrated on validation images, and write it as "
        "model NAME-int8 (at the source's version, never reusing one in --out) with a parity report against the fp32 package.",
    )
    quantize.add_argument("package", type=path_argument, help="the fp32 model package folder")
    quantize.add_argument(
        "--calibration",
        required=True,
        metavar="PATH",
        type=path_argument,
        help="validation images: a MedMNIST-layout .npz (see --split) or a folder of DICOM files",
    )
    quantize.add_argument("--split", default="val", choices=["train", "val", "test"], help="the npz split to calibrate on (default: val)")
    quantize.add_argument(
        "--images",
        type=positive_int,
        default=DEFAULT_IMAGES,
        help="images the activation ranges are observed on (default: %(default)s); the thresholds are refitted on the whole split or folder",
    )
    quantize.add_argument("--exclude", nargs="*", default=[], metavar="NODE", help="graph nodes to keep in float (default: none)")
    quantize.add_argument(
        "--per-tensor", action="store_true", help="one scale per weight tensor instead of one per output channel (the default)"
    )
    quantize.add_argument(
        "--out", type=path_argument, default=None, metavar="DIR", help="where to write the int8 package (default: PACKAGE-int8)"
    )
    quantize.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    import importlib.util
    import json
    import sys

    if importlib.util.find_spec("onnx") is None:
        raise ConfigError(
            "quantisation needs the onnx package, which the inference install leaves out",
            where=sys.prefix,  # the Python environment that lacks it
            hint=f"run it where models are exported, or add the export extras here: {sys.executable} -m pip install 'medtriage[train]'",
        )
    out = quantize_package(args.package, args.calibration, args.out, args.split, args.images, args.exclude, per_channel=not args.per_tensor)
    meta = json.loads((out / "model.json").read_text())
    print(json.dumps(meta["quantization"]["parity"], indent=2))
    print(f"int8 package {meta['name']} v{meta['version']} -> {out}", file=sys.stderr)
    return 0
