"""Export a trained model: calibrate, choose operating points, write and verify the ONNX package.

`export_model` works on a network and its validation predictions (no MLflow needed);
`export_run` is what training calls at the end of a run, and `export_from_mlflow` rebuilds the
same inputs from a finished MLflow run (scripts/export.py).
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import medtriage
from medtriage.errors import ConfigError, PackageError
from medtriage.export.calibration import expected_calibration_error, fit_temperature, probabilities
from medtriage.export.config import ExportConfig
from medtriage.export.onnx import INPUT_NAME, OUTPUT_NAME, CalibratedNet, check_parity, export_onnx, parity
from medtriage.export.operating_point import choose_threshold, priority_thresholds
from medtriage.export.package import ONNX_FILE, next_version, split_metrics, write_package
from medtriage.export.pathology import TilePool, pathology_block, tile_pool_of
from medtriage.serve.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)
ARTIFACT_DIR = "model_package"  # where the package lives among the MLflow run's artifacts


@dataclass
class SplitScores:
    """Logits of one split with labels and sites (training's `Predictions` has the same fields)."""

    logits: np.ndarray
    labels: np.ndarray
    sites: np.ndarray


@dataclass
class ExportResult:
    package_dir: Path
    meta: dict


def export_model(
    net, cfg: ExportConfig, *, label_names: Sequence[str], val: SplitScores, parity_images: Sequence[np.ndarray],
    test: SplitScores | None = None, training_sites: Sequence[str] = (), network: dict | None = None,
    provenance: dict | None = None, assign_version: Callable[[], int] | None = None, tile_pool: TilePool | None = None,
) -> ExportResult:
    """Calibrate on `val`, pick thresholds, export + parity-check ONNX, write `<models_dir>/<name>/`.
    A `tile_pool` (the model scores slide tiles) adds the `pathology` block with slide-level thresholds."""
    positive = _positive_index(label_names, cfg.positive_label)
    val_labels = np.asarray(val.labels).astype(int)
    temperature = fit_temperature(val.logits, val_labels) if cfg.calibrate else 1.0
    calibration = {
        "method": "temperature" if cfg.calibrate else "none", "temperature": temperature, "split": "val", "bins": cfg.ece_bins,
        "ece_before": expected_calibration_error(probabilities(val.logits), val_labels, cfg.ece_bins),
        "ece_after": expected_calibration_error(probabilities(val.logits, temperature), val_labels, cfg.ece_bins),
    }
    log.info("temperature %.3f: validation ECE %.4f -> %.4f", temperature, calibration["ece_before"], calibration["ece_after"])
    thresholds = _thresholds(probabilities(val.logits, temperature)[:, positive], val_labels == positive, cfg)
    metrics = {name: _metrics(split, temperature, positive, thresholds["review"]["threshold"])
               for name, split in (("val", val), ("test", test)) if split is not None}
    package_dir = Path(cfg.models_dir) / cfg.name
    with tempfile.TemporaryDirectory() as tmp:
        model = CalibratedNet(net, temperature)
        onnx_path = export_onnx(model, Path(tmp) / ONNX_FILE, cfg.opset)
        diff, count = parity(onnx_path, model, parity_images[: cfg.parity_images])
        check_parity(diff, cfg.parity_tolerance, onnx_path)
        meta = {
            "schema_version": SCHEMA_VERSION, "name": cfg.name,
            "version": assign_version() if assign_version else next_version(package_dir),
            "task": cfg.task, "label_names": list(label_names), "positive_label": label_names[positive], "modality": cfg.modality,
            "input": _input_spec(net), "output": {"name": OUTPUT_NAME, "classes": len(label_names), "calibrated": cfg.calibrate},
            "preprocessing": _preprocessing(net), "network": network or {}, "calibration": calibration,
            "thresholds": thresholds, "metrics": metrics, "training_sites": sorted(map(str, training_sites)),
            "provenance": {"medtriage_version": medtriage.__version__, "mlflow_run_id": None, "git_commit": None,
                           "data_fingerprint": None, **(provenance or {})},
            "parity": {"max_abs_diff": diff, "tolerance": cfg.parity_tolerance, "images": count, "split": "val", "runtime": "onnxruntime CPU"},
            "onnx": {"file": ONNX_FILE, "opset": cfg.opset},
        }
        if tile_pool is not None:
            test_scores = probabilities(test.logits, temperature)[:, positive] if test is not None else None
            meta["pathology"] = pathology_block(tile_pool, cfg, positive, probabilities(val.logits, temperature)[:, positive], test_scores)
        meta = write_package(package_dir, onnx_path, meta)
    log.info("model package written to %s", package_dir)
    return ExportResult(package_dir, meta)


def _positive_index(label_names: Sequence[str], positive_label: str | None) -> int:
    if positive_label is None:
        return len(label_names) - 1
    if positive_label not in label_names:
        raise ConfigError(f"positive label '{positive_label}' is not a label of this model", where="export.positive_label",
                          hint=f"use one of {list(label_names)}")
    return list(label_names).index(positive_label)


def _thresholds(scores: np.ndarray, is_positive: np.ndarray, cfg: ExportConfig) -> dict:
    review = choose_threshold(scores, is_positive, cfg.threshold_rule, cfg.threshold_target)
    urgent = choose_threshold(scores, is_positive, cfg.urgent_rule, cfg.urgent_target) if cfg.urgent_rule else None
    return priority_thresholds(review, urgent)


def _metrics(split: SplitScores, temperature: float, positive: int, threshold: float) -> dict:
    scores = probabilities(split.logits, temperature)[:, positive]
    return split_metrics(scores, np.asarray(split.labels) == positive, np.asarray(split.sites), threshold)


def _input_spec(net) -> dict:
    return {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "channels": net.preprocess.spec.in_channels,
            "value_range": [0.0, 1.0], "batch": "dynamic", "height": "dynamic", "width": "dynamic"}


def _preprocessing(net) -> dict:
    spec = net.preprocess.spec
    return {
        "decode": "medtriage.io.dicom.read_dicom: modality LUT, VOI LUT/window, MONOCHROME1 inverted, scaled to [0, 1] (outside the graph)",
        "channels": "RGB converted to luminance (ITU-R BT.601) when the model takes 1 channel (outside the graph)",
        "resize": {"size": spec.size, "mode": "bilinear", "antialias": True, "in_graph": True},
        "normalize": ({"per_image": True, "in_graph": True} if spec.intensity == "per_image"
                      else {"mean": spec.mean, "std": spec.std, "in_graph": True}),
    }


# --- called by training, and by scripts/export.py ---------------------------------------------

def export_run(run_id: str | None, checkpoint: str | Path, cfg: Any) -> Path:
    """Export the checkpoint of a training run with the run's resolved config (`cfg.export`, `cfg.data.pool_dir`);
    returns the package folder. With a run id, the package is logged to that run and registered."""
    from medtriage.training.checkpoint import load_model

    net, train_config = load_model(Path(checkpoint))
    return export_net(net, train_config, cfg, run_id)


def export_net(net, train_config: dict, cfg: Any, run_id: str | None) -> Path:
    """export_run for a network already built (a trained model, or an ensemble of several)."""
    from medtriage.data.manifest import load_manifest
    from medtriage.training.predict import predict

    config = _as_dict(cfg)
    export_cfg = ExportConfig(**config.get("export", {}))
    pool_dir = _lookup(config, "data.pool_dir") or _lookup(_as_dict(train_config), "data.pool_dir")
    if not pool_dir:
        raise ConfigError("the config names no data.pool_dir to take validation images from", where="data.pool_dir")
    manifest = load_manifest(pool_dir)
    net.eval()
    val = predict(net, manifest, "val")
    test = predict(net, manifest, "test") if len(manifest.split("test")) else None
    parity_images = list(manifest.images(np.asarray(val.row_indices)[: export_cfg.parity_images]))
    provenance = {"mlflow_run_id": run_id, "git_commit": _git_commit(run_id), "data_fingerprint": manifest.fingerprint}
    registration = _registrar(run_id, export_cfg)
    try:
        result = export_model(
            net, export_cfg, label_names=manifest.label_names, val=val, test=test, parity_images=parity_images,
            training_sites=manifest.split("train")["site"].unique(), network=_as_dict(config.get("model", {})),
            provenance=provenance, assign_version=registration,
            tile_pool=tile_pool_of(manifest, val.row_indices, test.row_indices if test is not None else None),
        )
        if run_id and export_cfg.log_to_mlflow:
            _log_to_mlflow(run_id, result)
    except BaseException:
        if registration is not None:
            registration.withdraw()
        raise
    if not (run_id and export_cfg.log_to_mlflow):
        print(f"model package {result.meta['name']} v{result.meta['version']} -> {result.package_dir}")
    return result.package_dir


def _as_dict(cfg: Any) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return dict(cfg or {})


def _lookup(config: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def _git_commit(run_id: str | None) -> str | None:
    if run_id:
        import mlflow

        commit = mlflow.MlflowClient().get_run(run_id).data.tags.get("mlflow.source.git.commit")
        if commit:
            return commit
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return out.stdout.strip() or None if out.returncode == 0 else None


class _Registration:
    """Registers the next model version of `name` (pointing at where the package will be logged) when
    called, and withdraws it again if the package never gets there: no version without its package."""

    def __init__(self, run_id: str, name: str):
        self.run_id, self.name, self.version = run_id, name, None

    def __call__(self) -> int:
        import mlflow
        from mlflow.exceptions import MlflowException

        client = mlflow.MlflowClient()
        try:
            client.create_registered_model(self.name, description="MedTriage ONNX model package (model.onnx, model.json, MODEL_CARD.md)")
        except MlflowException:
            pass  # already registered: add a version
        latest = max((int(v.version) for v in client.search_model_versions(f"name='{self.name}'")), default=0)
        source = f"{client.get_run(self.run_id).info.artifact_uri}/{artifact_path(latest + 1)}"
        self.version = int(client.create_model_version(self.name, source=source, run_id=self.run_id).version)
        if self.version != latest + 1:
            raise PackageError(f"another export registered '{self.name}' at the same time (got version {self.version}, "
                               f"expected {latest + 1})", hint="run the export again")
        return self.version

    def withdraw(self) -> None:
        if self.version is not None:
            import mlflow

            mlflow.MlflowClient().delete_model_version(self.name, str(self.version))
            log.warning("export failed: registered version %s of '%s' withdrawn", self.version, self.name)
            self.version = None


def _registrar(run_id: str | None, cfg: ExportConfig) -> _Registration | None:
    """The registration of the next model version, when this export registers one."""
    if not (run_id and cfg.register_model and cfg.log_to_mlflow):
        return None
    return _Registration(run_id, cfg.name)


def artifact_path(version: int) -> str:
    """Each version keeps its own folder among the run's artifacts, so a re-export never overwrites one."""
    return f"{ARTIFACT_DIR}/v{version}"


def _log_to_mlflow(run_id: str, result: ExportResult) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    meta = result.meta
    client.log_artifacts(run_id, str(result.package_dir), artifact_path=artifact_path(meta["version"]))
    for key, value in (("export_ece_before", meta["calibration"]["ece_before"]), ("export_ece_after", meta["calibration"]["ece_after"]),
                       ("export_temperature", meta["calibration"]["temperature"]), ("export_parity_max_abs_diff", meta["parity"]["max_abs_diff"]),
                       ("export_review_threshold", meta["thresholds"]["review"]["threshold"])):
        client.log_metric(run_id, key, float(value))
    client.set_tag(run_id, "medtriage.package", f"{meta['name']} v{meta['version']} sha256 {meta['sha256']}")
    print(f"model package {meta['name']} v{meta['version']} -> {result.package_dir} (logged to MLflow run {run_id})")
