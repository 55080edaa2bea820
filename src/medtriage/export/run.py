"""Export a trained model: calibrate, choose operating points, write and verify the ONNX package.

`export_model` works on a network and its validation predictions (no MLflow needed);
`export_run` is what the train-and-export workflow calls after a run, and `export_from_mlflow` rebuilds the
same inputs from a finished MLflow run (scripts/export.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import medtriage
from medtriage.config.schema import ExportConfig, trained_with_flips, value_problems
from medtriage.data.manifest import load_manifest
from medtriage.errors import ConfigError, PackageError
from medtriage.evaluation.calibration import probabilities
from medtriage.evaluation.metrics import finite
from medtriage.evaluation.operating_points import check_rule
from medtriage.evaluation.predictions import Predictions
from medtriage.export.onnx import (
    DIVERGED_HINT,
    INPUT_NAME,
    MAX_OPSET,
    MIN_OPSET,
    OUTPUT_NAME,
    CalibratedNet,
    check_dynamic_axes,
    check_graph_agrees,
    check_parity,
    export_onnx,
    parity,
)
from medtriage.export.ood import OodData, fit_ood, ood_parity
from medtriage.export.package import next_version, settle_package, split_metrics, write_package
from medtriage.export.pathology import TilePool, check_slide_settings, pathology_block, thresholds_by_export_rules, tile_pool_of
from medtriage.export.registry import (
    PACKAGE_STATE_TAG,
    PACKAGE_WRITING,
    Registration,
    artifact_path,
    log_package,
    registrar,
    run_git_commit,
)
from medtriage.export.safety import calibration_on_test, choose_calibration, drift_references, scope_from_rows
from medtriage.format import META_FILE, ONNX_FILE, SCHEMA_VERSION, meta_bytes, schema_errors, temperature_applied
from medtriage.format.schema import MODEL_SCHEMA
from medtriage.model.averaging import EnsembleNet, averaged, check_tta
from medtriage.model.checkpoint import config_value, load_model
from medtriage.model.networks import TriageNet
from medtriage.model.predict import predict

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    package_dir: Path
    meta: dict
    served: Any = None  # the torch module that was exported (CalibratedNet, or ScoredNet with its OOD score)


def export_model(
    net,
    cfg: ExportConfig,
    *,
    label_names: Sequence[str],
    val: Predictions,
    parity_images: Sequence[np.ndarray],
    test: Predictions | None = None,
    training_sites: Sequence[str] = (),
    network: dict | None = None,
    provenance: dict | None = None,
    assign_version: Callable[[], int] | None = None,
    tile_pool: TilePool | None = None,
    ood_data: OodData | None = None,
    scope: dict | None = None,
    held_out_split: str = "val",
    keep_previous: bool = False,
    scored_by: str | Path | None = None,
) -> ExportResult:
    """Calibrate on `val`, pick thresholds, export + parity-check ONNX, write `<models_dir>/<name>/`.
    A `tile_pool` (the model scores slide tiles) adds the `pathology` block with slide-level thresholds;
    `ood_data` (training and validation images, validation in `val`'s order) adds the in-graph OOD score
    and the drift references; `scope` is what the model may be shown (export/safety.py); `held_out_split` names what
    `val` is in model.json (`out-of-fold`: each image scored by a fold model that did not train on it); with
    `keep_previous`, the package it replaces stays aside until package.settle_package keeps or undoes the export;
    `scored_by` (the checkpoint or runs whose scores `val` and `test` are) is what a refusal of those scores names, else
    the MLflow run in `provenance`, else the package."""
    check_package_name(cfg.name)  # before any folder is made or looked into under it
    positive = positive_index(label_names, cfg.positive_label)
    _check_outputs_named(val.logits, label_names)
    _check_scores_finite(val, test, scored_by or _run_named(provenance) or Path(cfg.models_dir) / cfg.name)
    val_labels = np.asarray(val.labels).astype(int)
    calibration = choose_calibration(val.logits, val_labels, cfg.ece_bins, allowed=cfg.calibrate, split=held_out_split)
    temperature = calibration["temperature"]
    if test is not None:
        calibration["test"] = calibration_on_test(test.logits, test.labels, temperature, cfg.ece_bins)
    thresholds = thresholds_by_export_rules(cfg, probabilities(val.logits, temperature)[:, positive], val_labels == positive)
    metrics = {
        name: _metrics(split, temperature, positive, thresholds["review"]["threshold"])
        for name, split in (("val", val), ("test", test))
        if split is not None
    }
    package_dir, input_spec = Path(cfg.models_dir) / cfg.name, _input_spec(net)
    with tempfile.TemporaryDirectory() as tmp:
        ood = fit_ood(net, temperature, ood_data, cfg.ood_false_alarm_rate) if ood_data is not None and cfg.ood else None
        model = ood.model if ood else CalibratedNet(net, temperature)
        onnx_path = Path(tmp) / ONNX_FILE
        graph = export_onnx(model, onnx_path, cfg.opset)
        check_dynamic_axes(graph, input_spec, where=package_dir / ONNX_FILE)  # before parity feeds it one image at a time
        diff, count = parity(onnx_path, model, parity_images[: cfg.parity_images], where=package_dir / ONNX_FILE)
        check_parity(diff, cfg.parity_tolerance, package_dir / ONNX_FILE)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "name": cfg.name,
            "version": assign_version() if assign_version else next_version(package_dir),
            "task": cfg.task,
            "label_names": list(label_names),
            "positive_label": label_names[positive],
            "modality": cfg.modality,
            "input": input_spec,
            "output": output_spec(label_names, calibration),
            "preprocessing": _preprocessing(net),
            "network": network or {},
            "calibration": calibration,
            "thresholds": thresholds,
            "metrics": metrics,
            "training_sites": sorted(map(str, training_sites)),
            "provenance": {
                "medtriage_version": medtriage.__version__,
                "mlflow_run_id": None,
                "git_commit": None,
                "data_fingerprint": None,
                **(provenance or {}),
            },
            "parity": {
                "max_abs_diff": diff,
                "tolerance": cfg.parity_tolerance,
                "images": count,
                "split": held_out_split,
                "runtime": "onnxruntime CPU",
            },
            "onnx": {"file": ONNX_FILE, "opset": cfg.opset},
        }
        if scope is not None:
            meta["scope"] = scope
        if ood is not None:
            meta["ood"] = {
                **ood.block,
                "parity": ood_parity(onnx_path, ood.model, parity_images[: cfg.parity_images], package_dir / ONNX_FILE),
            }
        if ood_data is not None:
            meta["drift"] = drift_references(
                ood_data.val_images,
                net.preprocess.spec.in_channels,
                probabilities(val.logits, temperature)[:, positive],
                np.asarray(val.sites),
                ood.val_scores if ood is not None else None,
            )
            meta["drift"]["reference"]["split"] = held_out_split
        if tile_pool is not None:
            test_scores = probabilities(test.logits, temperature)[:, positive] if test is not None else None
            meta["pathology"] = pathology_block(tile_pool, cfg, positive, probabilities(val.logits, temperature)[:, positive], test_scores)
        check_graph_agrees(graph, meta, where=package_dir / META_FILE)
        meta = write_package(package_dir, onnx_path, meta, keep_previous)
    log.info("model package written to %s", package_dir)
    return ExportResult(package_dir, meta, model)


def check_package_name(name: object) -> None:
    """Refuse a package name that is not one plain folder name (model.json's rule): it names the package's folder under
    `models_dir`, so '../x' or 'a/b' would put the package, or the folders made on the way, somewhere else."""
    wrong = schema_errors(name, MODEL_SCHEMA["properties"]["name"], "export.name")
    if wrong:
        raise ConfigError(
            f"export.name={name!r} is not a package name",
            where="export.name",
            hint="letters, digits, '.', '_' and '-', starting with a letter or digit (it becomes the package's folder name)",
        )


def _check_outputs_named(logits, label_names: Sequence[str]) -> None:
    """The network scores as many classes as there are labels to name them (else model.json would name the graph's
    probabilities wrongly): a pool with other labels than the training's is refused here, before anything is exported."""
    width = np.asarray(logits).shape[-1]
    if width != len(label_names):
        raise ConfigError(
            f"the network scores {width} classes, but the pool names {len(label_names)} labels ({list(label_names)})",
            where="data.pool_dir",
            hint="export with the pool the model was trained on (leave data.pool_dir as the run had it)",
        )


def _check_scores_finite(val: Predictions, test: Predictions | None, where: str | Path) -> None:
    """NaN or infinite logits come from a diverged training: refused here, naming it, rather than deep in calibration."""
    for name, split in (("validation", val), ("test", test)):
        if split is not None:
            finite(split.logits, f"the network's {name} logits", where=str(where), hint=DIVERGED_HINT)


def _run_named(provenance: dict | None) -> str | None:
    run_id = (provenance or {}).get("mlflow_run_id")
    return f"MLflow run {run_id}" if run_id else None


def check_trained_labels(pool_labels: Sequence[str], train_config: dict, pool_dir) -> None:
    """The pool names its labels in the order the network was trained on: model.json names the graph's outputs with
    the pool's names, so a pool rebuilt with its labels in another order would serve 'normal' as 'pneumonia'."""
    trained = config_value(_as_dict(train_config), "data.label_names")
    if trained is not None and list(trained) != list(pool_labels):
        raise ConfigError(
            f"the pool names its labels {list(pool_labels)}, but the network was trained on {list(trained)}, in that order",
            where=pool_dir,
            hint="export with the pool the model was trained on, or rebuild the pool with the training's label names",
        )


def positive_index(label_names: Sequence[str], positive_label: str | None) -> int:
    """The index of `positive_label` (None: the last label) among the model's labels; refused when it is none."""
    if positive_label is None:
        return len(label_names) - 1
    if positive_label not in label_names:
        raise ConfigError(
            f"positive label '{positive_label}' is not a label of this model",
            where="export.positive_label",
            hint=f"use one of {list(label_names)}",
        )
    return list(label_names).index(positive_label)


def _metrics(split: Predictions, temperature: float, positive: int, threshold: float) -> dict:
    scores = probabilities(split.logits, temperature)[:, positive]
    return split_metrics(scores, np.asarray(split.labels) == positive, np.asarray(split.sites), threshold)


def output_spec(label_names: Sequence[str], calibration: dict) -> dict:
    """model.json's `output`: `calibrated` says whether the graph divides by a fitted temperature (export.calibrate
    only allows it; choose_calibration may keep the raw probabilities)."""
    return {"name": OUTPUT_NAME, "classes": len(label_names), "calibrated": temperature_applied(calibration)}


def spread(items: Sequence, count: int) -> list:
    """`count` of `items` evenly spaced from the first to the last (all of them when there are fewer): a split is
    often ordered by site, so its first rows would check the graph on one site's image sizes and intensities only."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).astype(int)]


def _input_spec(net) -> dict:
    return {
        "name": INPUT_NAME,
        "dtype": "float32",
        "layout": "NCHW",
        "channels": net.preprocess.spec.in_channels,
        "value_range": [0.0, 1.0],
        "batch": "dynamic",
        "height": "dynamic",
        "width": "dynamic",
    }


def _preprocessing(net) -> dict:
    spec = net.preprocess.spec
    averaging = {"test_time_augmentation": net.describe()} if isinstance(net, EnsembleNet) else {}
    return {
        "decode": "medtriage.io.dicom.read_dicom: modality LUT, VOI LUT/window, Presentation LUT (its table, else MONOCHROME1 or shape INVERSE inverted), scaled to [0, 1] (outside the graph)",
        "channels": "RGB converted to luminance (ITU-R BT.601) when the model takes 1 channel (outside the graph)",
        "resize": {"size": spec.size, **_member_sizes(net), "mode": "bilinear", "antialias": True, "in_graph": True},
        "normalize": (
            {"per_image": True, "in_graph": True}
            if spec.intensity == "per_image"
            else {"mean": spec.mean, "std": spec.std, "in_graph": True}
        ),
        **averaging,
    }


def _member_sizes(net) -> dict:
    """An ensemble of several input sizes: each (`size` is the largest, all a decoder needs to deliver)."""
    sizes = net.sizes if isinstance(net, EnsembleNet) else []
    return {"member_sizes": sizes} if len(sizes) > 1 else {}


# --- called by training, and by scripts/export.py ---------------------------------------------


def check_export_settings(export: Any) -> ExportConfig:
    """Refuse export settings that cannot work before a training is spent on them (the export runs at its end);
    returns them as the ExportConfig that export_run(checked=...) takes without checking again."""
    cfg = _typed_export_config(export)
    check_package_name(cfg.name)
    if not MIN_OPSET <= cfg.opset <= MAX_OPSET:
        raise ConfigError(
            f"export.opset={cfg.opset} cannot be exported",
            where="export.opset",
            hint=f"use an opset from {MIN_OPSET} (the graph's antialiased resize needs it) to {MAX_OPSET}",
        )
    check_tta(cfg.tta)
    for key, rule in (("threshold_rule", cfg.threshold_rule), ("urgent_rule", cfg.urgent_rule)):
        if rule is not None:
            check_rule(rule, where=f"export.{key}")
    for key, value in (("threshold_target", cfg.threshold_target), ("urgent_target", cfg.urgent_target)):
        if not 0 < value <= 1:
            raise ConfigError(f"export.{key}={value} is not a rate", where=f"export.{key}", hint="a sensitivity or specificity in (0, 1]")
    if not 0 < cfg.ood_false_alarm_rate < 1:
        raise ConfigError(
            f"export.ood_false_alarm_rate={cfg.ood_false_alarm_rate}",
            where="export.ood_false_alarm_rate",
            hint="a share in (0, 1), e.g. 0.01",
        )
    check_slide_settings(cfg)
    return cfg


def check_views_trained(tta: str, train_configs: Sequence[Any]) -> None:
    """Refuse mirrored views for any averaged model that never saw a mirrored image in training: to it they are out of
    distribution (a chest X-ray is not left-right symmetric), and averaging them in shifts every served score."""
    if tta != "flip":
        return
    unflipped = [k for k, config in enumerate(train_configs) if not trained_with_flips(_as_dict(config))]
    if unflipped:
        models = "the model was" if len(train_configs) == 1 else f"members {unflipped} of {len(train_configs)} were"
        raise ConfigError(
            f"test-time flip views averaged, but {models} trained without left-right flips",
            where="export.tta",
            hint="train with data.augment.hflip=true and trainer.augment_on=device, or choose export.tta=shift, affine or none",
        )


def _typed_export_config(export: Any) -> ExportConfig:
    """`export` as an ExportConfig, each value of its field's type and range: a re-export's `export.key=value`
    overrides come as untyped text, where a misspelt key or `ece_bins=abc` would otherwise fail deep inside the
    export, and it skips the training's check, where a value out of range fails only late (parity on 0 images, an
    OOD fit on none, ECE in 0 bins) or never (a nan parity tolerance passes every graph)."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(ExportConfig), _as_dict(export))
    except OmegaConfBaseException as err:
        key = f"export.{err.full_key}" if getattr(err, "full_key", None) else "export"
        raise ConfigError(
            str(err).splitlines()[0], where=key, hint="fix or drop that setting (the export group's keys: configs/export/)"
        ) from None
    wrong = value_problems(OmegaConf.create({"export": typed}), group="export.")
    if wrong:
        raise ConfigError(
            "export values no export can use: " + "; ".join(wrong.values()),
            where="export",
            hint="change them on the command line (export.key=value) or in the config",
        )
    return OmegaConf.to_object(typed)


def export_run(run_id: str | None, checkpoint: str | Path, cfg: Any, checked: ExportConfig | None = None) -> Path:
    """Export the checkpoint of a training run with the run's resolved config (`cfg.export`, `cfg.data.pool_dir`);
    returns the package folder. With a run id, the package is logged to that run and registered. `checked` is
    `cfg.export` as check_export_settings returned it, when that already ran; without it, the settings are checked here."""
    net, train_config = load_model(Path(checkpoint))
    scored_by = f"{checkpoint} (MLflow run {run_id})" if run_id else str(checkpoint)
    return export_net(net, train_config, cfg, run_id, checked, scored_by)


def export_net(
    net, train_config: dict, cfg: Any, run_id: str | None, checked: ExportConfig | None = None, scored_by: str | None = None
) -> Path:
    """export_run for a network already built (a trained model, or an ensemble of several); `scored_by`: what a
    refusal of its scores names (export_model), when not the run `run_id`."""
    config = _as_dict(cfg)
    export_cfg = checked if checked is not None else check_export_settings(config.get("export", {}))
    if isinstance(net, TriageNet):  # an ensemble's members were checked where their configs were loaded
        check_views_trained(export_cfg.tta, [train_config])
    pool_dir = config_value(config, "data.pool_dir") or config_value(_as_dict(train_config), "data.pool_dir")
    if not pool_dir:
        command = f"python scripts/export.py run_id={run_id} data.pool_dir=<folder>" if run_id else "data.pool_dir=<folder>"
        raise ConfigError(
            "the config names no data.pool_dir to take validation images from",
            where="data.pool_dir",
            hint=f"name the pool the model was trained on: {command}",
        )
    manifest = load_manifest(pool_dir)
    check_trained_labels(manifest.label_names, train_config, manifest.pool_dir)
    positive_index(manifest.label_names, export_cfg.positive_label)  # before the splits are scored, not after
    net = averaged(net, export_cfg.tta).eval() if isinstance(net, TriageNet) else net.eval()
    val = predict(net, manifest, "val")
    test = predict(net, manifest, "test") if len(manifest.split("test")) else None
    return export_tracked(
        net,
        export_cfg,
        run_id,
        label_names=manifest.label_names,
        val=val,
        test=test,
        parity_images=list(manifest.images(np.asarray(spread(val.row_indices, export_cfg.parity_images)))),
        training_sites=manifest.split("train")["site"].unique(),
        network=_as_dict(config.get("model", {})),
        provenance={"data_fingerprint": manifest.fingerprint},
        tile_pool=tile_pool_of(manifest, val.row_indices, test.row_indices if test is not None else None),
        ood_data=ood_data_of(manifest, val, export_cfg),
        scope=scope_from_rows(manifest.split("train"), export_cfg.modality),
        scored_by=scored_by,
    )


def export_tracked(net, export_cfg: ExportConfig, run_id: str | None, **inputs) -> Path:
    """`export_model(net, export_cfg, **inputs)`, its version registered and its package logged to the MLflow run
    `run_id` (when there is one); a failed export withdraws the version it took and puts the models folder back as it
    was (a package there that the registry does not know would be served, and the one it replaced lost)."""
    inputs["provenance"] = {"mlflow_run_id": run_id, "git_commit": run_git_commit(run_id), **inputs.get("provenance", {})}
    registration = registrar(run_id, export_cfg)
    package_dir, result, step = Path(export_cfg.models_dir) / export_cfg.name, None, "the export"
    try:
        result = export_model(net, export_cfg, assign_version=registration, keep_previous=True, **inputs)
        if run_id and export_cfg.log_to_mlflow:
            step = f"logging the package to MLflow run {run_id} ({artifact_path(result.meta['version'], result.meta['name'])})"
            log_package(run_id, result)
            if registration is not None:
                registration.confirm()
    except BaseException as err:
        if result is not None:
            settle_package(result.package_dir, result.meta, keep=False)
        registered = _withdrawn(registration, export_cfg.name)
        err.add_note(f"{step} failed: {registered}, {_held(package_dir)} as before")
        raise
    settle_package(result.package_dir, result.meta, keep=True)
    if not (run_id and export_cfg.log_to_mlflow):
        print(f"model package {result.meta['name']} v{result.meta['version']} -> {result.package_dir}")
    return result.package_dir


def _withdrawn(registration: Registration | None, name: str) -> str:
    """Withdraw the failed export's registered version; what the registry holds now, for the export's error. A withdrawal
    that fails too (the registry out of reach) is said there, not raised in place of the export's own error."""
    version = registration.version if registration is not None else None
    try:
        if registration is not None:
            registration.withdraw()
    except Exception as failure:  # noqa: BLE001 -- the export's error is the one to raise; this one is told with it
        return (
            f"version {version} of '{name}' stays registered, tagged {PACKAGE_STATE_TAG}={PACKAGE_WRITING}, as it could not be "
            f"withdrawn ({type(failure).__name__}: {failure}): delete that version in the model registry"
        )
    return f"no version of '{name}' was registered"


def _held(package_dir: Path) -> str:
    """What the package folder holds, for a message: its version, or no package."""
    try:
        return f"{package_dir} holds v{json.loads(meta_bytes(package_dir / META_FILE))['version']}"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, PackageError):
        return f"{package_dir} holds no package"


def ood_data_of(manifest, val: Predictions, cfg: ExportConfig) -> OodData:
    """Training images (a random subset of at most `ood_fit_images`) and validation images in `val`'s order."""
    train = np.flatnonzero(manifest.rows["split"].to_numpy() == "train")
    if len(train) > cfg.ood_fit_images:
        train = np.sort(np.random.default_rng(0).choice(train, cfg.ood_fit_images, replace=False))
    return OodData(
        list(manifest.images(train)),
        manifest.rows["label"].to_numpy()[train].astype(int),
        list(manifest.images(np.asarray(val.row_indices))),
    )


def _as_dict(cfg: Any) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:  # an override's ${...} that names nothing
            key = getattr(err, "full_key", None) or "config"
            raise ConfigError(str(err).splitlines()[0], where=key, hint="fix or drop the ${...} in that value") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):  # e.g. an override `export=5` that replaced the whole group
        raise ConfigError(
            f"expected a group of settings, got {cfg!r}", where="config", hint="override its keys (export.name=...), not the group"
        )
    return dict(cfg)
