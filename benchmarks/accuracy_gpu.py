"""Longer recipes on one GPU, judged on the default recipe's folds; writes `## Accuracy: GPU recipe`.

    python -m benchmarks.accuracy_gpu [--folds 3] [--seeds 0 1 2] [--trainer gpu] [--until cv] [--quick]

The default recipe (`experiment=pneumoniamnist_sota`) is bounded by its 15 min on 2 CPU cores; a GPU affords a larger
network and input. Each candidate of GPU_CANDIDATES is cross-validated on the same folds as the default recipe and
judged by the same rule (`benchmarks.accuracy_selection`: held-out log-loss after a cross-fitted temperature, better only
beyond one standard error of the paired fold differences) against the default recipe's fold scores, which that
benchmark keeps under outputs/benchmark_accuracy_stages/ (run it first). Only a candidate that is better on the folds
is then trained on the official train split per seed, exported (temperature and thresholds on validation, the recipe's
test-time views) and scored on test once per package, through `medtriage score --npz --split test`, with the seeds'
ensemble graph. When no candidate is better, nothing is trained or scored on test. `--until cv` stops after the folds
(their stages are kept: a later run goes on from there).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.accuracy_recipe import EXPERIMENT, NPZ, TARGET_ACC, TARGET_AUC, mean_sd_text, score_package, stage_dir, train_seed
from benchmarks.accuracy_selection import (
    BASE,
    INCUMBENT,
    QUICK,
    cross_validated,
    ensemble,
    gain_text,
    scored_folds,
    seeds_mean_ci,
    seeds_table_rows,
    select,
)
from benchmarks.common import ROOT, cached, command_line, header, machine, recipe_key, stage_file, verdict, write_section

SECTION = "## Accuracy: GPU recipe"
# The default recipe scaled up where a GPU has room: inputs upsampled to 128 px inside the model (twice the default's
# 64), twice its epochs, at a batch a GPU fills better (the learning rate as the default's: no batch scaling); once with
# its ResNet-18 and once with a ResNet-50, so the table shows what the larger network adds on its own.
SCALED_UP = ["model.preprocess.size=128", "trainer.max_epochs=60", "data.batch_size=128", "trainer.lr_scaling=none"]
GPU_CANDIDATES = {
    "gpu-resnet18-128": SCALED_UP,
    "gpu-resnet50-128": ["model=resnet50", *SCALED_UP],
}


def recipes(trainer: str, quick: bool) -> dict[str, list[str]]:
    """{label: overrides}: the default recipe as it stands (the incumbent, on its own trainer preset) and each candidate."""
    extra = QUICK if quick else []
    candidates = {label: [*BASE, f"trainer={trainer}", *overrides, *extra] for label, overrides in GPU_CANDIDATES.items()}
    return {INCUMBENT: [*BASE, *extra], **candidates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per training process")
    parser.add_argument("--trainer", default="gpu", help="the candidates' trainer preset (cpu: a smoke run without a GPU)")
    parser.add_argument("--until", choices=["cv", "test"], default="test", help="cv: stop after the folds and the choice")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 images per split, one epoch")
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args(argv)
    from medtriage.config import compose_train_config

    out_dir = stage_dir(args.quick)
    plans = recipes(args.trainer, args.quick)
    settings = [f"trainer.num_threads={args.threads}", f"cv.folds={args.folds}", f"cv.jobs={args.folds}"]
    # Composed here, in one thread: Hydra's state is global.
    configs = {label: compose_train_config([*recipe, *settings, "paths.output_dir=."]) for label, recipe in plans.items()}
    keys = {label: recipe_key(cfg) for label, cfg in configs.items()}  # the settings are run settings: not in the key
    # Every candidate's folds at once: one GPU holds them all, and each fold run alone leaves it mostly idle.
    with ThreadPoolExecutor(len(plans)) as pool:
        futures = {
            label: pool.submit(
                cross_validated,
                [*recipe, *settings],
                configs[label],
                keys[label],
                out_dir,
                args.folds,
                label == INCUMBENT and not args.quick,
            )
            for label, recipe in plans.items()
        }
        cv = {label: future.result() for label, future in futures.items()}
    scores = {
        label: scored_folds(cv[label], keys[label], configs[label].trainer.weights, out_dir=out_dir, folds=args.folds) for label in plans
    }
    selection = select(scores, INCUMBENT)  # on the folds alone
    chosen = selection["chosen"]
    print(f"cross-validation: {json.dumps(cv)}\nchosen on the folds: {chosen} ({json.dumps(selection)})", flush=True)
    if args.until == "cv":
        return 0
    runs, combined, seeds_ci = [], None, None
    if chosen != INCUMBENT:
        runs, combined, seeds_ci = trained_and_tested(chosen, plans[chosen], keys[chosen], configs[chosen].export.tta, args, out_dir)
    doc = args.doc or ROOT / ("outputs/benchmark_accuracy_gpu_quick.md" if args.quick else "docs/benchmarks.md")
    write_section(section(cv, chosen, selection, runs, combined, seeds_ci, args, command_line()), doc)
    print(f"written to {doc}")
    return 0


def trained_and_tested(
    chosen: str, recipe: list[str], key: str, tta: str, args, out_dir: Path
) -> tuple[list[dict], dict | None, tuple | None]:
    """The chosen recipe per seed (all at once, each its own process), then each package and the seeds' ensemble scored on
    test once, after every package exists."""
    quick = "-quick" if args.quick else ""
    names = {seed: f"pneumoniamnist-{chosen}-seed{seed}{quick}" for seed in args.seeds}
    with ProcessPoolExecutor(len(names), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                cached, stage_file(out_dir, f"seed{seed}", [key]), partial(train_seed, recipe, seed, args.threads, name, out_dir / name)
            )
            for seed, name in names.items()
        ]
        trained = [future.result() for future in futures]
    with ThreadPoolExecutor(len(trained)) as pool:
        runs = [{**result, **scored} for result, scored in zip(trained, pool.map(lambda r: score_package(Path(r["package"])), trained))]
    for run in runs:
        print(json.dumps(run, default=str), flush=True)
    if len(runs) < 2:
        return runs, None, None
    members = [r["run_id"] for r in runs]
    name = f"pneumoniamnist-{chosen}-ensemble{len(runs)}{quick}"
    packaged = cached(stage_file(out_dir, "ensemble", [key, *members, tta]), lambda: ensemble(members, name, tta))
    combined = {**packaged, **score_package(Path(packaged["package"]))}
    return runs, combined, seeds_mean_ci([r["package"] for r in runs])


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def section(cv: dict, chosen: str, selection: dict, runs: list[dict], combined, seeds_ci, args, command: str) -> str:
    cv_rows = [
        f"| {'**' + label + '**' if label == chosen else label} | `{' '.join(GPU_CANDIDATES.get(label, [])) or '(as the experiment)'}` "
        f"| {mean_sd_text(selection['scores'][label])} | {gain_text(selection['gains'].get(label))} | {r['mean_log_loss']:.4f} "
        f"| {r['mean_auc']:.4f} ± {r['sd_auc']:.4f} | {np.mean(r['fold_wall_s']) / 60:.1f} | `{r['run_id'][:8]}` |"
        for label, r in cv.items()
    ]
    lines = [
        SECTION,
        "",
        *header(
            command,
            f"{gpu_name()}; {machine()}; the default recipe's folds from its own CPU run (`python -m benchmarks.accuracy_selection`)",
            "; smoke run (--quick): tiny data, one epoch, figures meaningless" if args.quick else "",
        ),
        f"- candidates: `python scripts/cross_validate.py experiment={EXPERIMENT} trainer={args.trainer} <overrides> "
        f"cv.folds={args.folds}`, the folds of `## Accuracy: selection` (test left out of every fold run); fold runs of all "
        "candidates at once on the one GPU, so wall times are under that load",
        "- rule: as `## Accuracy: selection`: held-out log-loss after a cross-fitted temperature; a candidate replaces the "
        f"default recipe ({INCUMBENT}) only if better by more than one standard error of the paired fold differences; only the "
        "chosen recipe is trained per seed and scored on test, once per package",
        "",
        f"Cross-validation ({args.folds} folds; mean ± sd over folds; wall: minutes per fold run, {INCUMBENT}'s from its CPU "
        "cross-validation, the candidates' on the GPU):",
        "",
        f"| candidate | overrides | log-loss after temperature | gain over {INCUMBENT} ± SE | log-loss as trained | AUC "
        "| wall (min) | MLflow trial run |",
        "|---|---|---|---|---|---|---|---|",
        *cv_rows,
        "",
    ]
    if not runs:
        lines.append(f"Chosen: **{chosen}**: no GPU candidate beats it on the folds; nothing was trained or scored on test.")
    else:
        lines += _test_lines(chosen, runs, combined, seeds_ci, args.trainer)
    return "\n".join([*lines, "", *_verdicts(chosen, selection, runs, combined)]) + "\n"


def _test_lines(chosen: str, runs: list[dict], combined, seeds_ci, trainer: str) -> list[str]:
    overrides = " ".join(GPU_CANDIDATES[chosen])
    return [
        f"Chosen: **{chosen}**, trained with `python scripts/train.py experiment={EXPERIMENT} trainer={trainer} {overrides}`. "
        f"Test, scored once per package (`medtriage score <package> --npz {NPZ} --split test --json`; ACC at the validation "
        "Youden threshold and at 0.5; wall: training + export of one run, the seeds trained at once on the one GPU):",
        "",
        "| model | test AUC | 95% CI | test ACC (val Youden) | ACC @ 0.5 | val AUC | wall (min) | MLflow run |",
        "|---|---|---|---|---|---|---|---|",
        *seeds_table_rows(chosen, runs, combined, seeds_ci),
    ]


def _verdicts(chosen: str, selection: dict, runs: list[dict], combined) -> list[str]:
    """Is a GPU recipe better than the default recipe on the folds; and, where one was scored on test, the test targets."""
    best = max(selection["gains"], key=lambda label: selection["gains"][label][0])
    lines = [
        f"Targets: a GPU recipe better than {INCUMBENT} on the folds; its mean test AUC ≥ {TARGET_AUC} and ACC ≥ {TARGET_ACC} "
        "over 3 seeds, an ensemble above that.",
        f"- better on the folds (closest: {best}, gain {gain_text(selection['gains'][best])}): {verdict(chosen != INCUMBENT)}",
    ]
    if not runs:
        return [*lines, "- test targets: not assessed (no GPU recipe was chosen, so none was scored on test)"]
    aucs, accs = [r["test_auc"] for r in runs], [r["test_acc"] for r in runs]
    best_auc = max([np.mean(aucs)] + ([combined["test_auc"]] if combined else []))
    return [
        *lines,
        f"- mean test AUC {np.mean(aucs):.4f}: {verdict(np.mean(aucs) >= TARGET_AUC and len(runs) >= 3)}",
        f"- mean test ACC {np.mean(accs):.4f}: {verdict(np.mean(accs) >= TARGET_ACC and len(runs) >= 3)}",
        f"- best of seeds' mean and ensemble, test AUC {best_auc:.4f}: {verdict(best_auc >= TARGET_AUC)}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
