"""Several trained runs (and test-time views of the image) exported as ONE ONNX graph.

`medtriage.model.averaging.EnsembleNet` averages the members' class probabilities inside the graph;
`export_ensemble` builds the package from MLflow run ids and tracks it as a run of its own (members,
TTA, metrics, package).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
from omegaconf import OmegaConf

from medtriage.errors import ConfigError
from medtriage.export.from_mlflow import parse_overrides
from medtriage.export.registry import check_finished_run, find_checkpoint
from medtriage.export.run import check_export_settings, check_package_name, check_views_trained, export_net, positive_index
from medtriage.model.averaging import EnsembleNet
from medtriage.model.checkpoint import load_model
from medtriage.model.networks import TriageNet


def load_members(run_ids: Sequence[str], download_dir: Path) -> tuple[list[TriageNet], list[dict]]:
    """The best checkpoint of each run, rebuilt; with each run's resolved config. Every run is checked before the
    first checkpoint is downloaded: a mistyped or unfinished last id must not cost every download before it."""
    repeated = sorted({run_id for run_id in run_ids if list(run_ids).count(run_id) > 1})
    if repeated:
        raise ConfigError(
            f"run {', '.join(repeated)} is given more than once: it would weigh twice in the average",
            where=", ".join(run_ids),
            hint="give each member run once",
        )
    for run_id in run_ids:
        check_finished_run(run_id)
    members, configs = [], []
    for i, run_id in enumerate(run_ids):
        net, config = load_model(find_checkpoint(run_id, download_dir / f"member_{i}"))
        members.append(net)
        configs.append(config)
    _check_same_data(run_ids, configs)
    return members, configs


def _check_same_data(run_ids: Sequence[str], configs: list[dict]) -> None:
    """Refuse members trained on different data, naming each run's value of what differs (a sorted set of the values
    would not say which run holds which)."""
    values = {  # the members' outputs are averaged class by class: the labels, in order, too
        "pool_dir": [c["data"]["pool_dir"] for c in configs],
        "holdout_site": [c["data"].get("holdout_site") for c in configs],
        "label_names": [list(c["data"]["label_names"]) for c in configs],
    }
    differing = {key: found for key, found in values.items() if any(value != found[0] for value in found)}
    if differing:
        each = "; ".join(
            f"{key} " + ", ".join(f"{value} in run {run_id}" for run_id, value in zip(run_ids, found, strict=True))
            for key, found in differing.items()
        )
        raise ConfigError(
            f"the runs were trained on different data ({each})",
            where=", ".join(f"data.{key}" for key in differing),
            hint="ensemble runs trained on the same pool, with the same holdout site and the same labels in the same order",
        )


def export_ensemble(run_ids: Sequence[str], name: str, tta: str = "none", overrides: Sequence[str] = ()) -> tuple[Path, str, EnsembleNet]:
    """Package the ensemble of `run_ids` as `<models_dir>/<name>/`; returns (package dir, its MLflow run id, the net)."""
    check_package_name(name)  # the name and the overrides are refused before any checkpoint is downloaded
    changes = parse_overrides([f"export.name={name}", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        members, configs = load_members(run_ids, Path(tmp))
    check_views_trained(tta, configs)
    config = OmegaConf.merge(OmegaConf.create(configs[0]), changes)
    export_cfg = check_export_settings(config.export)  # before the ensemble's MLflow run is made: a refusal leaves none
    positive_index(configs[0]["data"]["label_names"], export_cfg.positive_label)  # the members' (_check_same_data)
    net = EnsembleNet(members, tta).eval()
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(run_ids[0]).info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{name}-ensemble") as run:
        mlflow.log_params(
            {
                "ensemble.members": ",".join(run_ids),
                "ensemble.size": len(run_ids),
                "ensemble.tta": tta,
                "export.name": name,
                "model.name": configs[0]["model"]["name"],
                "model.preprocess.size": ",".join(map(str, net.sizes)),
            }
        )
        mlflow.set_tags({"ensemble": "true", "data_fingerprint": client.get_run(run_ids[0]).data.tags.get("data_fingerprint", "")})
        package = export_net(net, configs[0], config, run.info.run_id, export_cfg, scored_by=f"MLflow runs {', '.join(run_ids)}")
    return package, run.info.run_id, net
