"""The fold models of one cross-validation served as one ensemble, calibrated on their out-of-fold predictions.

`scripts/cross_validate.py` trains one model per fold of train + validation pooled (test left out of every run).
Together the fold models have seen every labelled image, and each image was held out from exactly one of them. Their
ensemble therefore learns from all the labelled data, which matters when a class is scarce, and still gets its
temperature, operating points and drift references from images their scorer had not trained on: each image scored by
the fold model that held it out (out-of-fold). Those are one member's scores, not the ensemble's. An average of
members is slightly less extreme than each member, so the calibration is close, not exact; model.json says
`calibration.split: out-of-fold` and the model card says what that means. Its OOD score is set the same way: each fold
model fitted on its own training images and thresholded on the images it held out. A refit's members held out
nothing, so a refit package carries no OOD score.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from omegaconf import OmegaConf

from medtriage.config.schema import ExportConfig
from medtriage.data.manifest import Manifest, load_manifest
from medtriage.data.sources.registry import load_pool
from medtriage.data.torch.datasets import cache_split
from medtriage.errors import ConfigError, DataNotFoundError
from medtriage.evaluation.predictions import Predictions
from medtriage.export.ood import OodData
from medtriage.export.run import export_tracked, ood_data_of
from medtriage.export.safety import scope_from_rows
from medtriage.model.averaging import EnsembleNet, averaged
from medtriage.model.checkpoint import final_checkpoint, load_model
from medtriage.model.networks import TriageNet
from medtriage.model.predict import predict_cached

FOLD_DIR = re.compile(r"fold(\d+)")
HELD_OUT_SPLIT = "out-of-fold"
REFIT_SPLIT = "out-of-fold (refit)"  # the same scores; the served models are not the ones that produced them


@dataclass
class FoldMembers:
    nets: list[TriageNet]
    configs: list[dict]
    manifests: list[Manifest]  # each fold's pool: its held-out images are its "val" split


@dataclass
class FoldEnsemble:
    package_dir: Path
    run_id: str
    net: EnsembleNet
    out_of_fold: Predictions  # as the package was calibrated on: views averaged, before temperature


def fold_members(cv_dir: Path) -> FoldMembers:
    """Each `fold<k>/` model of the cross-validation in `cv_dir` (its final weights), with its config and its fold."""
    cv_dir = Path(cv_dir)
    folds = sorted((int(m.group(1)), p) for p in cv_dir.glob("fold*") if (m := FOLD_DIR.fullmatch(p.name)))
    if not folds:
        raise DataNotFoundError(
            "no fold models found",
            where=cv_dir,
            hint="pass the run folder of `scripts/cross_validate.py`, which holds fold0/, fold1/, ... (it prints it when done)",
        )
    nets, configs, manifests = [], [], []
    for _, fold_dir in folds:
        net, config = _final_model(fold_dir / "checkpoints")
        nets.append(net.eval())
        configs.append(config)
        manifests.append(load_pool(OmegaConf.create(config["data"])))
    _check_one_cross_validation(cv_dir, configs)
    return FoldMembers(nets, configs, manifests)


def _final_model(checkpoints: Path) -> tuple[TriageNet, dict]:
    """The weights the fold run ended with by its own rule (`trainer.weights`), as its held-out score was taken."""
    net, config = load_model(final_checkpoint(checkpoints, "last"))
    weights = config["trainer"].get("weights", "best")
    return (net, config) if weights == "last" else load_model(final_checkpoint(checkpoints, weights))


def _check_one_cross_validation(cv_dir: Path, configs: Sequence[dict]) -> None:
    """The folds must be the folds of one cut of one pool, each once: else their held-out images overlap or miss."""
    cuts = {(c["data"]["pool_dir"], c["data"].get("cv_folds"), c["data"].get("cv_seed"), c["data"].get("limit")) for c in configs}
    folds = sorted(c["data"].get("cv_fold") for c in configs if c["data"].get("cv_fold") is not None)
    (_, count, _, _), *others = sorted(cuts, key=str)
    if others or count is None or folds != list(range(count)):
        raise ConfigError(
            f"the fold models in {cv_dir} are not the {count or '?'} folds of one cross-validation "
            f"(folds {folds}, cuts {sorted(map(str, cuts))})",
            where=cv_dir,
            hint="export the folder of one finished `scripts/cross_validate.py` run, with every fold trained",
        )


def out_of_fold(members: FoldMembers, tta: str) -> tuple[Predictions, list[np.ndarray], list[Predictions]]:
    """Every held-out image scored by the fold model that held it out (averaged over `tta` views), the images, and
    each fold model's part (in member order: the parts joined are the first)."""
    parts, images, seen = [], [], set()
    for net, config, manifest in zip(members.nets, members.configs, members.manifests, strict=True):
        held_out = cache_split(manifest, "val", net.preprocess, config["data"].get("limit"), config["trainer"]["seed"])
        predictions = predict_cached(averaged(net, tta).eval(), held_out)
        rows = set(map(int, predictions.row_indices))
        if rows & seen:
            raise ConfigError(
                "the folds' held-out images overlap", where=manifest.pool_dir, hint="export the folds of one cross-validation"
            )
        seen |= rows
        parts.append(predictions)
        images += list(manifest.images(np.asarray(predictions.row_indices)))
    joined = Predictions(
        np.concatenate([p.logits for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.sites for p in parts]),
        np.concatenate([p.row_indices for p in parts]),
    )
    return joined, images, parts


def _experiment_id(name: str) -> str:
    """The folds' own experiment in the current tracking store (the caller chose the store)."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def export_fold_ensemble(cv_dir: Path, name: str, tta: str = "none", overrides: Sequence[str] = ()) -> FoldEnsemble:
    """Package the fold models of the cross-validation in `cv_dir` as one ensemble `<models_dir>/<name>/`, calibrated
    on their out-of-fold predictions, tracked as an MLflow run of the folds' experiment in the current tracking store."""
    members = fold_members(cv_dir)
    tags = {"cross_validation": "true"}
    return _export_out_of_fold(members.nets, members, cv_dir, name, tta, overrides, HELD_OUT_SPLIT, f"{name}-folds", tags)


def export_refit(cv_dir: Path, refit_dirs: Sequence[Path], name: str, tta: str = "none", overrides: Sequence[str] = ()) -> FoldEnsemble:
    """Package the refit runs in `refit_dirs` (the recipe of the cross-validation in `cv_dir`, trained with
    `data.refit=true` on all its images) as one model `<models_dir>/<name>/`, calibrated on the cross-validation's
    out-of-fold predictions, which stand in for the refit models' own held-out scores (they have none)."""
    members = fold_members(cv_dir)
    nets = [_refit_model(Path(d), members.configs[0]) for d in refit_dirs]
    if not nets:
        raise ConfigError("no refit runs given", where="--refit", hint="pass the run folder of each `data.refit=true` training")
    tags = {"refit": "true", "refit_runs": ",".join(str(Path(d).resolve()) for d in refit_dirs)}
    return _export_out_of_fold(nets, members, cv_dir, name, tta, overrides, REFIT_SPLIT, f"{name}-refit", tags)


# What a refit may differ in from the folds' runs: run settings, not the recipe (trainer.seed: seeds are members).
TRAINER_RUN_SETTINGS = {"seed", "num_threads", "device", "resume", "resume_from", "stop_after_epochs"}


def _refit_model(run_dir: Path, fold_config: dict) -> TriageNet:
    """A refit run's final weights, checked to be the folds' recipe on the folds' pool."""
    checkpoints = run_dir / "checkpoints"
    if not (checkpoints / "last.pt").is_file():
        raise DataNotFoundError(
            "no refit checkpoint found", where=checkpoints / "last.pt", hint="pass the run folder of a finished `data.refit=true` training"
        )
    net, config = load_model(checkpoints / "last.pt")
    differs = [
        key
        for key in ("model", "pool_dir", "limit", "batch_size", "trainer", "augment")
        if _recipe_part(config, key) != _recipe_part(fold_config, key)
    ]
    if not config["data"].get("refit") or differs:
        raise ConfigError(
            f"{run_dir} is not a refit of the cross-validation's recipe ("
            + ("not trained with data.refit=true" if not config["data"].get("refit") else f"its {', '.join(differs)} differ")
            + ")",
            where=run_dir,
            hint="train the folds' overrides with data.refit=true (the seed may differ), then export it with their folder",
        )
    return net.eval()


def _recipe_part(config: dict, key: str):
    if key == "model":
        return config["model"]
    if key == "trainer":
        return {k: v for k, v in config["trainer"].items() if k not in TRAINER_RUN_SETTINGS}
    return config["data"].get(key)


def _export_out_of_fold(
    nets: list[TriageNet],
    members: FoldMembers,
    cv_dir: Path,
    name: str,
    tta: str,
    overrides: Sequence[str],
    split: str,
    run_name: str,
    tags: dict,
) -> FoldEnsemble:
    """Export `nets` as one package calibrated on the out-of-fold predictions of `members` (the cross-validation)."""
    config = OmegaConf.merge(OmegaConf.create(members.configs[0]), OmegaConf.from_dotlist([f"export.name={name}", *overrides]))
    export_cfg = ExportConfig(**OmegaConf.to_container(config.export, resolve=True))
    served_folds = split == HELD_OUT_SPLIT
    if export_cfg.ood and not served_folds:
        # Each fold model sets its OOD threshold on the images it held out; a refit's members held out none.
        print("refit: exported without an OOD score (its members trained on every labelled image: none is left to set a threshold on)")
    export_cfg = dataclasses.replace(export_cfg, ood=export_cfg.ood and served_folds, tta=tta)
    val, images, parts = out_of_fold(members, tta)
    per_member = [ood_data_of(m, part, export_cfg) for m, part in zip(members.manifests, parts)] if served_folds else None
    pooled = members.manifests[0]
    labelled = pooled.rows[pooled.rows["split"] != "test"]
    net = EnsembleNet(nets, tta).eval()
    with mlflow.start_run(experiment_id=_experiment_id(config.tracking.experiment_name), run_name=run_name) as run:
        mlflow.log_params(
            {
                "ensemble.cross_validation": str(Path(cv_dir).resolve()),
                "ensemble.size": len(nets),
                "ensemble.tta": tta,
                "ensemble.calibration": split,
                "export.name": name,
                "model.name": members.configs[0]["model"]["name"],
            }
        )
        mlflow.set_tags({"ensemble": "true", **tags})
        package = export_tracked(
            net,
            export_cfg,
            run.info.run_id,
            label_names=pooled.label_names,
            val=val,
            parity_images=images[: export_cfg.parity_images],
            training_sites=labelled["site"].unique(),
            network=OmegaConf.to_container(config.model, resolve=True),
            provenance={"data_fingerprint": load_manifest(pooled.pool_dir).fingerprint},
            ood_data=OodData([], np.zeros(0, dtype=int), images, per_member),  # the drift references use `images`
            scope=scope_from_rows(labelled, export_cfg.modality),
            held_out_split=split,
        )
    return FoldEnsemble(package, run.info.run_id, net, val)
