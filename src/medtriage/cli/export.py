"""`python scripts/export.py run_id=<id> [export.key=value ...]` and `scripts/export_ensemble.py`: packages from MLflow runs.

The package lands in `<export.models_dir>/<export.name>/`, is logged to the run and registered in MLflow.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from medtriage.arguments import path_as_typed
from medtriage.cli import report_errors
from medtriage.errors import ConfigError
from medtriage.model.averaging import TTA

# MLflow and the exporters are imported once the arguments are found sound: a mistyped command answers at once.


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """`run_id=<id>` plus dotted overrides, Hydra style."""
    bad = [a for a in argv if "=" not in a]
    run_ids = [a.split("=", 1)[1] for a in argv if a.startswith("run_id=")]
    if bad or len(run_ids) != 1 or not run_ids[0]:
        raise ConfigError(
            f"expected run_id=<mlflow run id> [key=value ...], got {' '.join(argv) or 'nothing'}",
            hint="find run ids with `mlflow ui` or mlflow.search_runs()",
        )
    return run_ids[0], [a for a in argv if not a.startswith("run_id=")]


def main(argv: list[str] | None = None) -> int:
    return report_errors(_export_run, sys.argv[1:] if argv is None else argv)


def _export_run(argv: list[str]) -> int:
    run_id, overrides = parse_args(argv)
    from medtriage.export.from_mlflow import RUN_EXPORT_KEYS, export_from_mlflow, reexport_changes

    reexport_changes(overrides, (*RUN_EXPORT_KEYS, STORE_KEY))  # before the project's config is composed
    _use_project_store()
    export_from_mlflow(run_id, _use_named_store(overrides))
    return 0


def _use_project_store() -> None:
    """Look runs up in the store training records them in (tracking.uri: MLFLOW_TRACKING_URI, else the project's
    mlflow.db), not in MLflow's default, an mlflow.db in whatever folder the command runs from."""
    import mlflow

    from medtriage.config import compose_train_config

    mlflow.set_tracking_uri(compose_train_config(["experiment=pneumoniamnist"]).tracking.uri)


STORE_KEY = "tracking.uri"
STORE_OVERRIDE = f"{STORE_KEY}="


def _use_named_store(overrides: list[str]) -> list[str]:
    """After `_use_project_store`: a `tracking.uri=...` override names the store, as it did for the training (merged
    into the run's config, it would be read by nothing, and the run looked for in another store). The other overrides."""
    stores = [o.removeprefix(STORE_OVERRIDE) for o in overrides if o.startswith(STORE_OVERRIDE)]
    if stores:
        import mlflow

        mlflow.set_tracking_uri(stores[-1])
    return [o for o in overrides if not o.startswith(STORE_OVERRIDE)]


def ensemble_main(argv: list[str] | None = None) -> int:
    """`python scripts/export_ensemble.py --name NAME RUN_ID RUN_ID ... [--tta shift|affine|flip] [export.key=value ...]`, or
    `--cross-validation DIR [DIR ...]` for the fold models of one `scripts/cross_validate.py` run, or of several cut
    alike (calibrated out-of-fold), or `--cross-validation DIR --refit RUN_DIR ...` for that recipe refitted on all its
    images (`data.refit=true`), calibrated on the same out-of-fold scores.

    No test-time views by default; "flip" is for tissue, not chest X-rays (the heart is on one side)."""
    parser = ensemble_parser()
    args = parser.parse_args(argv)
    run_ids = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    for option in ("cross_validation", "refit"):  # `--cross-validation DIR export.key=value` takes the override as a DIR
        given = getattr(args, option) or []
        overrides += [item for item in given if _is_override(item)]
        setattr(args, option, [Path(item) for item in given if not _is_override(item)] or None)
    if args.refit and not args.cross_validation:
        parser.error("--refit needs --cross-validation DIR: the refit is calibrated on that cross-validation's out-of-fold scores")
    if bool(run_ids) == bool(args.cross_validation):
        parser.error("give either MLflow run ids or --cross-validation DIR (one of them, not both)")
    if args.refit and len(args.cross_validation) > 1:
        parser.error("--refit is calibrated on the out-of-fold scores of its own recipe: give one --cross-validation DIR")
    return report_errors(_export_ensemble, args, run_ids, overrides)


OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=.*")  # export.name=x; a sweep's job folder (0_cv.folds=3) starts with its number


def _is_override(item: str) -> bool:
    return bool(OVERRIDE.fullmatch(item)) and not Path(item).exists()


def ensemble_parser() -> argparse.ArgumentParser:
    """The command line of `ensemble_main` (its checks of one option against another follow the parse)."""
    parser = argparse.ArgumentParser(description="Package several trained models as one ONNX graph (mean of member probabilities).")
    parser.add_argument("items", nargs="*", help="MLflow run ids (none with --cross-validation), then optional export.key=value overrides")
    parser.add_argument("--name", required=True, help="package and registered-model name")
    parser.add_argument(
        "--cross-validation",
        type=path_as_typed,  # as typed: an override taken in with the folders is given back whole (Path drops a //)
        nargs="+",
        metavar="DIR",
        help="the folder of a cross-validation (its fold<k>/ runs): serve its fold models, calibrated on their out-of-fold "
        "predictions; several folders (recipes cross-validated on the same folds) serve all their fold models together",
    )
    parser.add_argument(
        "--refit",
        type=path_as_typed,
        nargs="+",
        metavar="RUN_DIR",
        help="with --cross-validation: serve these data.refit=true runs of its recipe instead of its fold models",
    )
    parser.add_argument(
        "--tta",
        choices=TTA,
        default="none",
        help="also average over views: one-pixel shifts (shift), also small turns and zooms (affine), or also the "
        "left-right mirror (flip: only for models trained with data.augment.hflip=true; not for chest X-rays); "
        "default: %(default)s",
    )
    return parser


def _export_ensemble(args: argparse.Namespace, run_ids: list[str], overrides: list[str]) -> int:
    from medtriage.export.ensemble import export_ensemble
    from medtriage.export.fold_ensemble import check_finished_runs, export_fold_ensemble, export_refit

    check_ensemble_overrides(overrides, args)
    _use_project_store()
    overrides = _use_named_store(overrides)
    check_finished_runs(args.cross_validation or [], args.refit or [])
    if args.refit:
        refit = export_refit(args.cross_validation[0], args.refit, args.name, tta=args.tta, overrides=overrides)
        package, run_id = refit.package_dir, refit.run_id
    elif args.cross_validation:
        folds = export_fold_ensemble(args.cross_validation, args.name, tta=args.tta, overrides=overrides)
        package, run_id = folds.package_dir, folds.run_id
    else:
        package, run_id, _ = export_ensemble(run_ids, args.name, tta=args.tta, overrides=overrides)
    print(f"ensemble package {package} (MLflow run {run_id})")
    return 0


# What an ensemble reads of its overrides besides tracking.uri: an ensemble of runs is scored on its pool (export_net);
# fold models on their own folds' pools, in a run filed under tracking.experiment_name (export.fold_ensemble).
RUNS_ENSEMBLE_KEYS = ("export.*", "data.pool_dir", STORE_KEY)
FOLDS_ENSEMBLE_KEYS = ("export.*", "tracking.experiment_name", STORE_KEY)


def check_ensemble_overrides(overrides: list[str], args: argparse.Namespace) -> None:
    """Refuse, by name, an override the ensemble would not read (the members' model and training are their own), and
    export.name or export.tta other than --name and --tta, which are what the ensemble is made with."""
    from medtriage.export.from_mlflow import reexport_changes

    options = {"export.name": ("--name", args.name), "export.tta": ("--tta", args.tta)}
    reexport_changes(overrides, FOLDS_ENSEMBLE_KEYS if args.cross_validation else RUNS_ENSEMBLE_KEYS, options)


if __name__ == "__main__":
    sys.exit(main())
