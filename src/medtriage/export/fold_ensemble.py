"""The fold models of cross-validations served as one ensemble, calibrated on their out-of-fold predictions.

`scripts/cross_validate.py` trains one model per fold of train + validation pooled (test left out of every run).
Together the fold models have seen every labelled image, and each image was held out from exactly one of them. Their
ensemble therefore learns from all the labelled data, which matters when a class is scarce, and still gets its
temperature, operating points and drift references from images their scorer had not trained on: each image scored by the
fold model that held it out (out-of-fold). Several cross-validations of one cut (different recipes on the same folds)
serve together the same way: each image is then scored by the mean of the fold models that held it out, one per recipe.
Those are the scores of some members, not of the whole ensemble. An average of more members is slightly less extreme, so
the calibration is close, not exact; model.json says `calibration.split: out-of-fold` and the model card says what that
means. Recipes may upsample the images to different sizes: the graph resizes once per size. Its OOD score is set the
same way: each fold model fitted on its own training images, scaled on the images it held out, and the threshold set on
the mean score of the members that held each image out. A refit's members held out nothing, so a refit package carries
no OOD score. Test was left out of every fold run and every refit, so the package reports the served ensemble's own
test metrics, as a single run's package does, at the thresholds set out-of-fold.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from medtriage.data.manifest import Manifest, load_manifest
from medtriage.data.sources.registry import load_pool
from medtriage.data.torch.datasets import limit_rows
from medtriage.errors import ConfigError, DataNotFoundError
from medtriage.evaluation.predictions import Predictions
from medtriage.export.from_mlflow import parse_overrides
from medtriage.export.ood import OodData
from medtriage.export.run import (
    check_export_settings,
    check_package_name,
    check_views_trained,
    export_tracked,
    ood_data_of,
    positive_index,
    spread,
)
from medtriage.export.safety import scope_from_rows
from medtriage.model.averaging import EnsembleNet, averaged
from medtriage.model.checkpoint import final_checkpoint, load_model
from medtriage.model.networks import TriageNet
from medtriage.model.predict import predict, predict_split

FOLD_DIR = re.compile(r"fold(\d+)")
RUN_FINISHED = "metrics.json"  # training.report.METRICS_FILE: what a run folder holds once its training ended
HELD_OUT_SPLIT = "out-of-fold"
REFIT_SPLIT = "out-of-fold (refit)"  # the same scores; the served models are not the ones that produced them


@dataclass
class FoldMembers:
    nets: list[TriageNet]
    configs: list[dict]
    manifests: list[Manifest]  # each fold's pool: its held-out images are its "val" split
    folds: list[int]  # the fold each member held out (cross-validations of one cut share them)

    def holders(self) -> list[list[int]]:
        """The members that held out each fold, in fold order (one per cross-validation)."""
        return [[k for k, held in enumerate(self.folds) if held == fold] for fold in sorted(set(self.folds))]


@dataclass
class FoldEnsemble:
    package_dir: Path
    run_id: str
    net: EnsembleNet
    out_of_fold: Predictions  # as the package was calibrated on: views averaged, before temperature


def fold_members(cv_dirs: Path | Sequence[Path]) -> FoldMembers:
    """Each `fold<k>/` model (its final weights) of the cross-validation in each of `cv_dirs`, with its config, its
    fold's pool and its fold; several cross-validations must be of one cut (the same folds of the same pool)."""
    return with_pools(fold_runs(cv_dirs))


def fold_runs(cv_dirs: Path | Sequence[Path]) -> FoldMembers:
    """fold_members without their pools (`manifests` empty), checked from the fold runs' configs alone: loading a pool
    may rebuild a folder other runs share, so an export that is refused must be refused before it (`with_pools`)."""
    cv_dirs = _as_list(cv_dirs)
    if len(set(d.resolve() for d in cv_dirs)) != len(cv_dirs):
        raise ConfigError("a cross-validation is given twice", where=" ".join(map(str, cv_dirs)), hint="give each folder once")
    each = [_one_cross_validation(d) for d in cv_dirs]
    if len(each) > 1:
        _check_one_cut(cv_dirs, [m.configs for m in each])
    members = FoldMembers(*([item for one in each for item in getattr(one, f.name)] for f in dataclasses.fields(FoldMembers)))
    _check_pool_built_alike(cv_dirs, members.configs)
    return members


def with_pools(members: FoldMembers) -> FoldMembers:
    """`members` with each one's fold of its pool, the pool built when missing or built with other settings."""
    return dataclasses.replace(members, manifests=[load_pool(OmegaConf.create(c["data"])) for c in members.configs])


def _as_list(cv_dirs: Path | Sequence[Path]) -> list[Path]:
    return [Path(cv_dirs)] if isinstance(cv_dirs, (str, Path)) else [Path(d) for d in cv_dirs]


def _one_cross_validation(cv_dir: Path) -> FoldMembers:
    folds = sorted((int(m.group(1)), p) for p in cv_dir.glob("fold*") if (m := FOLD_DIR.fullmatch(p.name)))
    if not folds:
        raise DataNotFoundError(
            "no fold models found",
            where=cv_dir,
            hint="pass the run folder of `scripts/cross_validate.py`, which holds fold0/, fold1/, ... (it prints it when done)",
        )
    nets, configs = [], []
    for _, fold_dir in folds:
        net, config = _final_model(fold_dir / "checkpoints")
        nets.append(net.eval())
        configs.append(config)
    _check_one_cross_validation(cv_dir, configs)
    return FoldMembers(nets, configs, [], [c["data"]["cv_fold"] for c in configs])


def check_finished_runs(cv_dirs: Sequence[Path], refit_dirs: Sequence[Path] = ()) -> None:
    """Refuse a fold or refit run that did not finish (no metrics.json, which a training writes as it ends): its
    checkpoints hold a model trained part of the way (for a fold, not the one its held-out scores were taken with),
    which the package would serve as if it were the run's. scripts/export_ensemble.py checks this first."""
    folds = [p for cv_dir in cv_dirs for p in sorted(Path(cv_dir).glob("fold*")) if FOLD_DIR.fullmatch(p.name)]
    for run_dir, what, hint in [
        *((p, "fold run", "run the cross-validation again; the fold's train.log says why it stopped") for p in folds),
        *(
            (Path(p), "refit run", "resume it with its overrides plus trainer.resume_from=<its folder>, or train it again")
            for p in refit_dirs
        ),
    ]:
        if not (run_dir / RUN_FINISHED).is_file():
            reason = f"no {RUN_FINISHED} in this {what}'s folder: its training failed or was stopped, or it is no run folder"
            raise DataNotFoundError(reason, where=run_dir, hint=hint)


def _final_model(checkpoints: Path) -> tuple[TriageNet, dict]:
    """The weights the fold run ended with by its own rule (`trainer.weights`), as its held-out score was taken."""
    net, config = load_model(final_checkpoint(checkpoints, "last"))
    weights = config["trainer"].get("weights", "best")
    return (net, config) if weights == "last" else load_model(final_checkpoint(checkpoints, weights))


# data.<key> -> what runs differing in it did: what decides a fold run's held-out images (the pool, the site left out of
# it, how many folds, the seed of the cut and any image limit)
CUT = {
    "pool_dir": "were cut from different pools",
    "holdout_site": "held out different sites",
    "cv_folds": "have different numbers of folds",
    "cv_seed": "were cut with different seeds",
    "limit": "limit their images differently",
}
# data.source -> the data.<key>s its builder (data.sources.registry) builds the pool from: runs of one data.pool_dir
# that differ in one rebuilt it
POOL_BUILD = {"npz": ("npz_path",), "sites": ("sites_dir", "pool_seed"), "tiles": ("tiles",)}


def _cut(config: dict) -> tuple:
    """What decides a fold run's held-out images (CUT's settings, in its order)."""
    return tuple(config["data"].get(key) for key in CUT)


def _check_one_cross_validation(cv_dir: Path, configs: Sequence[dict]) -> None:
    """The folds must be the folds of one cut of one pool, each once: else their held-out images overlap or miss."""
    cuts = {_cut(c) for c in configs}
    folds = sorted(c["data"].get("cv_fold") for c in configs if c["data"].get("cv_fold") is not None)
    first, *others = sorted(cuts, key=str)
    count = first[list(CUT).index("cv_folds")]
    if others or count is None or folds != list(range(count)):
        raise ConfigError(
            f"the fold models in {cv_dir} are not the {count or '?'} folds of one cross-validation "
            f"(folds {folds}, cuts {sorted(map(str, cuts))})",
            where=cv_dir,
            hint="export the folder of one finished `scripts/cross_validate.py` run, with every fold trained",
        )


def _pool_build(configs: Sequence[dict]) -> dict[str, list]:
    """data.<key> -> each config's value, of the settings that decide how their pool is built (by their sources)."""
    sources = [c["data"].get("source") for c in configs]
    keys = dict.fromkeys(key for source in sources for key in POOL_BUILD.get(source, ()))
    return {"source": sources, **{key: [c["data"].get(key) for c in configs] for key in keys}}


def _check_pool_built_alike(cv_dirs: Sequence[Path], configs: Sequence[dict]) -> None:
    """The members' pool is one folder (_check_one_cut): built with other settings for each, loading them in turn
    would rebuild it for each, under other runs that share it, and their held-out images would differ anyway."""
    differ = _build_differences(configs)
    if differ:
        raise ConfigError(
            f"the fold runs built their pool {configs[0]['data'].get('pool_dir')} with different settings "
            f"({'; '.join(f'data.{key} {_versus(values)}' for key, values in differ.items())})",
            where=" ".join(map(str, cv_dirs)),
            hint=f"serve together only fold runs trained on one build of the pool (the same {', '.join(f'data.{key}' for key in differ)})",
        )


def _build_differences(configs: Sequence[dict]) -> dict[str, list]:
    """The pool build settings the configs differ in, with each config's value."""
    return {key: values for key, values in _pool_build(configs).items() if len(set(map(str, values))) > 1}


def _check_one_cut(cv_dirs: Sequence[Path], configs: Sequence[Sequence[dict]]) -> None:
    """Cross-validations served together must share their folds: each image then has the same holders in every one."""
    cuts = [_cut(each[0]) for each in configs]
    differs = [(k, key) for k, key in enumerate(CUT) if len({cut[k] for cut in cuts}) > 1]
    if differs:
        raise ConfigError(
            "the cross-validations are not cut alike: they "
            + "; they ".join(f"{CUT[key]} ({_versus(cut[k] for cut in cuts)})" for k, key in differs)
            + ", so their held-out images differ",
            where=" ".join(map(str, cv_dirs)),
            hint=f"serve together only cross-validations trained with the same {', '.join(f'data.{key}' for _, key in differs)}",
        )


def _versus(values) -> str:
    """Each distinct value once, in the order met: 'site-a vs site-b'."""
    return " vs ".join(dict.fromkeys("none" if v is None else str(v) for v in values))


def out_of_fold(members: FoldMembers, tta: str) -> tuple[Predictions, list[np.ndarray], list[Predictions]]:
    """Every held-out image scored by the mean of the fold models that held it out (one per cross-validation), averaged
    over `tta` views; the images; and each fold's part, in fold order (the parts joined are the first)."""
    parts, images, seen = [], [], set()
    for fold, holders in enumerate(members.holders()):  # every fold, before any is scored
        _check_held_out_alike(members, holders, fold)
    for holders in members.holders():
        config, manifest = members.configs[holders[0]], members.manifests[holders[0]]
        nets = [members.nets[k] for k in holders]
        scorer = averaged(nets[0], tta) if len(nets) == 1 else EnsembleNet(nets, tta)
        predictions = predict_split(scorer.eval(), manifest, "val", config["data"].get("limit"), config["trainer"]["seed"])
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


def _held_out_rows(config: dict, manifest: Manifest) -> list[int]:
    """The rows a fold run held out, as it took them (`cache_split`: a limit samples them by the run's seed)."""
    return limit_rows(manifest.split("val"), config["data"].get("limit"), config["trainer"]["seed"]).index.tolist()


def _check_held_out_alike(members: FoldMembers, holders: Sequence[int], fold: int) -> None:
    """The members holding out one fold must hold out the same images, or their mean scores no image out-of-fold."""
    rows = {tuple(_held_out_rows(members.configs[k], members.manifests[k])) for k in holders}
    if len(rows) > 1:
        raise ConfigError(
            f"the cross-validations hold out different images in fold {fold} ({_why_held_out_differ(members, holders)})",
            where=members.manifests[holders[0]].pool_dir,
            hint="serve together only cross-validations whose folds hold out the same images",
        )


def _why_held_out_differ(members: FoldMembers, holders: Sequence[int]) -> str:
    """Cut alike (_check_one_cut) from a pool built alike (_check_pool_built_alike), the holders differ in the seed
    that sampled their data.limit, or else in the pools they were given."""
    seeds = [members.configs[k]["trainer"]["seed"] for k in holders]
    if members.configs[holders[0]]["data"].get("limit") is not None and len(set(seeds)) > 1:
        return f"data.limit sampled with trainer.seed {_versus(seeds)}"
    return "their pools differ"


def _experiment_id(name: str) -> str:
    """The folds' own experiment in the current tracking store (the caller chose the store)."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def export_fold_ensemble(cv_dirs: Path | Sequence[Path], name: str, tta: str = "none", overrides: Sequence[str] = ()) -> FoldEnsemble:
    """Package the fold models of the cross-validation in `cv_dirs` (or of several, cut alike) as one ensemble
    `<models_dir>/<name>/`, calibrated on their out-of-fold predictions, tracked as an MLflow run of the folds' experiment
    in the current tracking store."""
    check_package_name(name)  # before the fold models are loaded
    changes = parse_overrides([f"export.name={name}", *overrides])  # so is a mistyped override
    members = fold_runs(cv_dirs)
    tags = {"cross_validation": "true"}
    scored_by = " ".join(map(str, _as_list(cv_dirs)))
    return _export_out_of_fold(members.nets, members, cv_dirs, tta, changes, HELD_OUT_SPLIT, f"{name}-folds", tags, scored_by)


def export_refit(cv_dir: Path, refit_dirs: Sequence[Path], name: str, tta: str = "none", overrides: Sequence[str] = ()) -> FoldEnsemble:
    """Package the refit runs in `refit_dirs` (the recipe of the cross-validation in `cv_dir`, trained with
    `data.refit=true` on all its images) as one model `<models_dir>/<name>/`, calibrated on the cross-validation's
    out-of-fold predictions, which stand in for the refit models' own held-out scores (they have none)."""
    check_package_name(name)  # before the fold models are loaded
    changes = parse_overrides([f"export.name={name}", *overrides])  # so is a mistyped override
    if not refit_dirs:
        raise ConfigError("no refit runs given", where="--refit", hint="pass the run folder of each `data.refit=true` training")
    members = fold_runs(cv_dir)
    nets = [_refit_model(Path(d), members.configs[0]) for d in refit_dirs]
    tags = {"refit": "true", "refit_runs": ",".join(str(Path(d).resolve()) for d in refit_dirs)}
    scored_by = " ".join(map(str, [cv_dir, *refit_dirs]))  # the folds score validation, the refits test
    return _export_out_of_fold(nets, members, cv_dir, tta, changes, REFIT_SPLIT, f"{name}-refit", tags, scored_by)


# What a refit may differ in from the folds' runs: run settings, not the recipe (trainer.seed: seeds are members).
TRAINER_RUN_SETTINGS = {"seed", "num_threads", "device", "resume", "resume_from", "stop_after_epochs"}
# What a refit must share with the folds' runs: their out-of-fold scores stand in for its own held-out scores only when
# it trained the same network on the same images (data.holdout_site: which site's images are left out of them all).
RECIPE = ("model", "data.pool_dir", "data.holdout_site", "data.label_names", "data.limit", "data.batch_size", "trainer", "data.augment")


def _refit_model(run_dir: Path, fold_config: dict) -> TriageNet:
    """A refit run's final weights, checked to be the folds' recipe on the folds' pool."""
    checkpoints = run_dir / "checkpoints"
    if not (checkpoints / "last.pt").is_file():
        raise DataNotFoundError(
            "no refit checkpoint found", where=checkpoints / "last.pt", hint="pass the run folder of a finished `data.refit=true` training"
        )
    net, config = load_model(checkpoints / "last.pt")
    differs = [key for key in RECIPE if _recipe_part(config, key) != _recipe_part(fold_config, key)]
    if not config["data"].get("refit") or differs:
        raise ConfigError(
            f"{run_dir} is not a refit of the cross-validation's recipe ("
            + ("not trained with data.refit=true" if not config["data"].get("refit") else f"its {', '.join(differs)} differ")
            + "): it would be calibrated on the out-of-fold scores of another recipe or of other images",
            where=run_dir,
            hint="train the folds' overrides (the same data.holdout_site among them) with data.refit=true (the seed may "
            "differ), then export it with their folder",
        )
    return net.eval()


def _recipe_part(config: dict, key: str):
    if key == "model":
        return config["model"]
    if key == "trainer":
        return {k: v for k, v in config["trainer"].items() if k not in TRAINER_RUN_SETTINGS}
    return config["data"].get(key.removeprefix("data."))


def _export_out_of_fold(
    nets: list[TriageNet],
    members: FoldMembers,
    cv_dirs: Path | Sequence[Path],
    tta: str,
    changes: DictConfig,
    split: str,
    run_name: str,
    tags: dict,
    scored_by: str | None = None,
) -> FoldEnsemble:
    """Export `nets` as one package calibrated on the out-of-fold predictions of `members` (the cross-validation, as
    fold_runs returns it: its pools are loaded here, once nothing is left to refuse in their configs); `scored_by`
    names the folders whose models scored them, for a refusal of their scores."""
    config = OmegaConf.merge(OmegaConf.create(members.configs[0]), changes)
    export_cfg = check_export_settings(config.export)  # before a pool is built or the fold models score any image
    positive_index(members.configs[0]["data"]["label_names"], export_cfg.positive_label)  # a pool's are its config's (load_pool)
    check_views_trained(tta, members.configs)  # a refit's augmentation is its folds' (_refit_model)
    members = with_pools(members)
    served_folds = split == HELD_OUT_SPLIT
    if export_cfg.ood and not served_folds:
        # Each fold model sets its OOD threshold on the images it held out; a refit's members held out none.
        print("refit: exported without an OOD score (its members trained on every labelled image: none is left to set a threshold on)")
    export_cfg = dataclasses.replace(export_cfg, ood=export_cfg.ood and served_folds, tta=tta)
    val, images, parts = out_of_fold(members, tta)
    ood_data = OodData([], np.zeros(0, dtype=int), images)  # the drift references use its `val_images`: the out-of-fold images
    if served_folds:  # a fold's holders share its training and held-out images: read them once per fold
        groups = members.holders()
        per_fold = [ood_data_of(members.manifests[group[0]], part, export_cfg) for group, part in zip(groups, parts)]
        fold_of = {k: f for f, group in enumerate(groups) for k in group}
        ood_data = dataclasses.replace(ood_data, per_member=[per_fold[fold_of[k]] for k in range(len(nets))], holders=groups)
    pooled, pool = members.manifests[0], load_manifest(members.manifests[0].pool_dir)
    labelled = pooled.rows[pooled.rows["split"] != "test"]
    net = EnsembleNet(nets, tta).eval()
    test = predict(net, pool, "test") if len(pool.split("test")) else None  # left out of every member's training
    with mlflow.start_run(experiment_id=_experiment_id(config.tracking.experiment_name), run_name=run_name) as run:
        mlflow.log_params(
            {
                "ensemble.cross_validation": ",".join(str(Path(d).resolve()) for d in _as_list(cv_dirs)),
                "ensemble.size": len(nets),
                "ensemble.tta": tta,
                "ensemble.calibration": split,
                "export.name": export_cfg.name,
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
            test=test,
            parity_images=spread(images, export_cfg.parity_images),
            training_sites=labelled["site"].unique(),
            network=OmegaConf.to_container(config.model, resolve=True),
            provenance={"data_fingerprint": pool.fingerprint},
            ood_data=ood_data,
            scope=scope_from_rows(labelled, export_cfg.modality),
            held_out_split=split,
            scored_by=scored_by,
        )
    return FoldEnsemble(package, run.info.run_id, net, val)
