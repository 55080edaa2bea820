"""The default recipe refitted on all labelled images, calibrated out-of-fold; writes `## Accuracy: refit`.

    python -m benchmarks.accuracy_refit [--seeds 0 1 2] [--threads 2] [--folds 3] [--quick]

A seed package of the default recipe learns from the official train split alone: 388 normal images, while validation
holds 135 more, kept out for the temperature and thresholds. The fold models of its cross-validation see two thirds
of train + validation each. A refit (`data.refit=true`) trains the same recipe on all of train + validation: all 523
normal images. It has no held-out images of its own, so it is served calibrated on the out-of-fold scores of the
recipe's cross-validation (kept by `python -m benchmarks.accuracy_selection`: run it first), which stand in for its
own (`scripts/export_ensemble.py --refit`). This benchmark trains one refit per seed, packages each seed alone and the
seeds together, and scores each package's test split once, through `medtriage score --npz --split test`. Every stage
is kept, so a rerun rewrites the section without training or scoring test again.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.accuracy import PUBLISHED
from benchmarks.accuracy_folds import scored_export
from benchmarks.accuracy_recipe import NPZ, TARGET_ACC, TARGET_AUC
from benchmarks.accuracy_selection import BASE, INCUMBENT, QUICK, check_refolded, kept_default_folds, scored_folds, seeds_mean_ci
from benchmarks.common import ROOT, cached, command_line, header, machine, mean_sd_text, recipe_key, stage_file, verdict, write_section
from medtriage.evaluation.bootstrap import mean_sd

SECTION = "## Accuracy: refit"
PACKAGE = "pneumoniamnist-sota-refit"
REFIT = ["data.refit=true"]


def more_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each refit (trained one at a time)")


def main(argv: list[str] | None = None) -> int:
    import mlflow

    from medtriage.config import compose_train_config

    args, cfg, key, trial, out_dir = kept_default_folds(argv, __doc__, more_arguments)
    rescored = scored_folds(trial, key, cfg.trainer.weights, ("none",), out_dir=out_dir, folds=args.folds)
    check_refolded(rescored, mlflow.MlflowClient(), trial["run_id"])  # the kept fold models are the trial's
    recipe = [*BASE, *(QUICK if args.quick else []), *REFIT]
    refit_key = recipe_key(compose_train_config([*recipe, "paths.output_dir=."]))
    cv_dir, tta, models_dir = out_dir / trial["cv_dir"], cfg.export.tta, cfg.export.models_dir
    suffix = "-quick" if args.quick else ""
    stages = {seed: stage_file(out_dir, f"refit-seed{seed}", [refit_key]) for seed in args.seeds}
    runs = [
        cached(path, lambda seed=seed, path=path: train_refit(recipe, seed, args.threads, path.with_suffix("")))
        for seed, path in stages.items()
    ]
    seeds = [
        cached(
            stage_file(out_dir, "refit-package", [refit_key, key, run["run_id"], tta]),
            lambda run=run: scored_refit(cv_dir, [run], f"{PACKAGE}-seed{run['seed']}{suffix}", tta, models_dir),
        )
        for run in runs
    ]
    members = [run["run_id"] for run in runs]
    together = cached(
        stage_file(out_dir, "refit-package", [refit_key, key, *members, tta]),
        lambda: (
            scored_refit(cv_dir, runs, f"{PACKAGE}{suffix}", tta, models_dir) | {"seeds_ci": seeds_mean_ci([s["package"] for s in seeds])}
        ),
    )
    doc = args.doc or ROOT / ("outputs/benchmark_accuracy_refit_quick.md" if args.quick else "docs/benchmarks.md")
    write_section(section(runs, seeds, together, trial, args, command_line()), doc)
    print(f"written to {doc}")
    return 0


def train_refit(recipe: list[str], seed: int, threads: int, run_dir: Path) -> dict:
    """`python scripts/train.py <recipe> data.refit=true` for one seed (no package: a refit has nothing to calibrate on)."""
    from medtriage.config import compose_train_config
    from medtriage.workflows.train_and_export import train_and_export

    cfg = compose_train_config([*recipe, f"trainer.seed={seed}", f"trainer.num_threads={threads}", f"paths.output_dir={run_dir}"])
    started = time.perf_counter()
    result = train_and_export(cfg)
    return {"seed": seed, "run_id": result.run_id, "run_dir": str(run_dir), "wall_s": time.perf_counter() - started, "threads": threads}


def scored_refit(cv_dir: Path, runs: list[dict], name: str, tta: str, models_dir: str) -> dict:
    """The refit runs packaged as one model calibrated on the cross-validation's out-of-fold scores; test scored once."""
    from medtriage.export.fold_ensemble import export_refit

    export = lambda: export_refit(cv_dir, [Path(r["run_dir"]) for r in runs], name, tta=tta, overrides=[f"export.models_dir={models_dir}"])  # noqa: E731
    return scored_export(export) | {"seeds": [r["seed"] for r in runs]}


def _row(model: str, r: dict, ci: tuple[float, float] | None = None) -> str:
    low, high = ci or (r["ci_low"], r["ci_high"])
    return (
        f"| {model} | {r['test_auc']:.4f} | [{low:.3f}, {high:.3f}] | {r['test_acc']:.4f} (t = {r['youden_threshold']:.3f}) "
        f"| {r['test_acc_argmax']:.4f} | {r['test_acc_finding']:.4f} | `{r['run_id'][:8]}` |"
    )


def section(runs: list[dict], seeds: list[dict], together: dict, trial: dict, args, command: str) -> str:
    cells = {key: mean_sd_text([s[key] for s in seeds]) for key in ("test_auc", "test_acc", "test_acc_argmax", "test_acc_finding")}
    (auc, _), (acc, _) = mean_sd([s["test_auc"] for s in seeds]), mean_sd([s["test_acc"] for s in seeds])
    low, high = together["seeds_ci"]
    minutes = [r["wall_s"] / 60 for r in runs]
    rows = [
        *(_row(f"{INCUMBENT} refit, seed {s['seeds'][0]}", s) for s in seeds),
        f"| **{INCUMBENT} refit, mean ± sd of {len(seeds)} seeds** | **{cells['test_auc']}** | [{low:.3f}, {high:.3f}] "
        f"| **{cells['test_acc']}** | {cells['test_acc_argmax']} | {cells['test_acc_finding']} | — |",
        _row(f"{INCUMBENT} refit: ensemble of the {len(seeds)} seeds (one ONNX graph)", together),
        *(f"| *published:* {name} | {p_auc:.3f} | — | {p_acc:.3f} (argmax) | — | — | — |" for name, p_auc, p_acc in PUBLISHED),
    ]
    r = together
    lines = [
        SECTION,
        "",
        *header(command, f"{machine()}; CPU", "; smoke run (--quick): tiny data, one epoch, figures meaningless" if args.quick else ""),
        f"- refit: `python scripts/train.py experiment=pneumoniamnist_sota data.refit=true trainer.seed=S` ({INCUMBENT}, the "
        "default recipe, trained on train + validation pooled: no validation split, test left out, the last EMA weights); "
        f"seeds {', '.join(str(r['seed']) for r in runs)}; {runs[0]['threads']} torch threads each, one at a time: "
        f"{' + '.join(f'{m:.1f}' for m in minutes)} min (as measured, beside whatever else the machine ran then)",
        f"- packages: `python scripts/export_ensemble.py --name NAME --cross-validation <the trial's folder> --refit <run "
        f"folder> ... --tta {r['views']}`, one per seed and one of all seeds; temperature ({r['temperature']:.3f} for the "
        f"seeds together) and thresholds fitted on the {r['out_of_fold_images']} out-of-fold scores ({r['out_of_fold_normal']} "
        f"normal) of the recipe's cross-validation kept by `python -m benchmarks.accuracy_selection` (MLflow trial run "
        f"`{trial['run_id'][:8]}`, {args.folds} folds, out-of-fold AUC {r['out_of_fold_auc']:.4f}): the fold models' scores "
        "stand in for the refit's, which has no held-out images",
        f"- test scoring: `medtriage score <package> --npz {NPZ} --split test --json` as a subprocess, once per package; "
        "ACC at Youden's J on the out-of-fold scores (fixed before test was scored), at the calibrated argmax (0.5) and of "
        "the package's finding (review threshold: sensitivity ≥ 0.95 out-of-fold); AUC 95% CI: 1,000 bootstrap resamples "
        "of the test images (for the seeds' mean, each resample scored by every seed's package)",
        "- what was seen before: the default recipe's seed packages and its fold ensemble had been scored on test "
        "(`## Accuracy: selection`, `## Accuracy: fold ensemble`); the refit was decided before any refit was scored, and "
        "nothing about it was changed after",
        "",
        "| model | test AUC | 95% CI | test ACC (out-of-fold Youden) | ACC @ 0.5 | ACC of package finding | MLflow run |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The same recipe trained on the train split alone, each seed calibrated on validation: `## Accuracy: default "
        "recipe` (and its 3-seed ensemble in `## Accuracy: selection`).",
        "",
        "Targets: mean test AUC ≥ 0.99 and ACC ≥ 0.95 over 3 seeds, an ensemble above that.",
        f"- mean test AUC {auc:.4f}: {verdict(auc >= TARGET_AUC)}",
        f"- mean test ACC {acc:.4f}: {verdict(acc >= TARGET_ACC)}",
        f"- ensemble test AUC {r['test_auc']:.4f}: {verdict(r['test_auc'] >= max(TARGET_AUC, auc))}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
