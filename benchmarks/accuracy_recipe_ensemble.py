"""Recipes cross-validated on the same folds, their fold models served together; writes `## Accuracy: recipe ensemble`.

    python -m benchmarks.accuracy_recipe_ensemble [--folds 3] [--quick]

`benchmarks.accuracy_selection` judges recipes one against another and drops the losers. A recipe that loses alone may
still err on other images than the default recipe, and every fold run holds out the same images whatever its recipe
(the cut depends on the pool, the fold count and the fold seed only). So each image's mean over the recipes' fold
models that held it out is an out-of-fold score of serving those fold models together, and recipes can be chosen for
an ensemble on the folds alone. The rule, greedy forward selection: start from the default recipe; add the recipe that
lowers the folds' log-loss after a cross-fitted temperature most, if it beats the ensemble so far by more than one
standard error of the paired fold differences (`accuracy_selection.compared`); stop at the first that does not. The
chosen recipes' fold models are exported as one package (`scripts/export_ensemble.py --cross-validation DIR DIR ...`,
calibrated on the same out-of-fold means) and test is scored once.

RECIPES may upsample the images to other sizes than the default's 64 px (the graph resizes once per size). Each
recipe's cross-validation is kept under the stage folder by recipe, where `benchmarks.accuracy_selection` keeps the
default's (run now when not kept: about an hour per recipe on 2 CPU cores). Results are kept, so a rerun rewrites the
section without scoring test again.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.accuracy_folds import TEST_SCORING, scored_export, test_table
from benchmarks.accuracy_recipe import served_document, stage_dir
from benchmarks.accuracy_selection import BASE, INCUMBENT, QUICK, compared, cross_validated, gain_text, paired_gain
from benchmarks.common import ROOT, cached, command_line, header, joined_since, machine, mean_sd_text, recipe_key, stage_file, write_section

SECTION = "## Accuracy: recipe ensemble"
PACKAGE = "pneumoniamnist-sota-recipes"
RECIPES = {  # label -> overrides of the experiment config; the first is the default recipe, where selection starts
    INCUMBENT: [],
    # The same network trained 50 epochs instead of 30, in bf16 autocast: another end point of the same recipe.
    "bf16-50-epochs": ["trainer.precision=bf16", "trainer.channels_last=true", "trainer.max_epochs=50"],
    # A shallower network: fewer features, other mistakes.
    "resnet10": ["model=resnet10"],
    # Warm-up and cosine decay instead of one cycle: other weights at the end of the same epochs.
    "cosine": ["trainer.schedule=cosine"],
    # The same network seeing the 28 px images upsampled to other sizes: other filters at other scales.
    "96px-bf16": ["trainer.precision=bf16", "trainer.channels_last=true", "model.preprocess.size=96"],
    "80px-20-epochs": ["model.preprocess.size=80", "trainer.max_epochs=20"],
    # bf16-50-epochs again from another seed: other initial weights and batches, the same folds.
    "bf16-50-epochs-seed1": ["trainer.precision=bf16", "trainer.channels_last=true", "trainer.max_epochs=50", "trainer.seed=1"],
}
# The first candidate added after the ensemble the rule chose from the candidates above it had been scored on test; it
# and every later entry of RECIPES were judged by the same rule, on the folds alone.
FIRST_AFTER_TEST = "96px-bf16"
FIRST_TESTED = ("balanced-longer", "bf16-50-epochs")  # what the rule chose then


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, RECIPES, PACKAGE, section)


def run(argv: list[str] | None, description: str, recipes: dict[str, list[str]], package: str, write: Callable) -> int:
    """A benchmark of `recipes` on the same folds: their cross-validations, the greedy choice, the chosen package scored
    on test once (when more than the default recipe is chosen), and its section, `write(predictions, trials, steps,
    chosen, result, tta, args, command)`, into docs/benchmarks.md (a smoke run's into outputs/)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 images per split, one epoch of each fold")
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args(argv)
    trials, predictions, cfg = recipes_on_folds(recipes, args.folds, args.quick)
    steps = greedy(predictions)
    chosen = [step["added"] for step in steps if step["standing"] in ("start", "better")]
    result = tested_ensemble(chosen, trials, package, cfg, args.quick)
    benchmark = write.__module__.rsplit(".", 1)[-1]  # a smoke run writes outputs/benchmark_<its module>_quick.md
    doc = args.doc or ROOT / (f"outputs/benchmark_{benchmark}_quick.md" if args.quick else "docs/benchmarks.md")
    write_section(write(predictions, trials, steps, chosen, result, cfg.export.tta, args, command_line()), doc)
    print(f"written to {doc}")
    return 0


def recipes_on_folds(recipes: dict[str, list[str]], folds: int, quick: bool) -> tuple[dict, dict, Any]:
    """Each recipe's cross-validation on the same folds (kept from an earlier run, else run now) and its out-of-fold
    probabilities with the served views: (trials, predictions, the composed config of the last recipe)."""
    from medtriage.config import compose_train_config

    out_dir = stage_dir(quick)
    settings = ["trainer.num_threads=1", f"cv.folds={folds}", f"cv.jobs={folds}"]
    trials, predictions = {}, {}
    for label, overrides in recipes.items():
        recipe = [*BASE, *overrides, *(QUICK if quick else [])]  # a smoke run stays one epoch whatever the recipe
        cfg = compose_train_config([*recipe, *settings, "paths.output_dir=."])
        key = recipe_key(cfg)
        trials[label] = cross_validated([*recipe, *settings], cfg, key, out_dir, folds, need_kept=False)
        cv_dir = out_dir / trials[label]["cv_dir"]
        path = stage_file(out_dir, "out-of-fold", [key, f"folds={folds}", cfg.export.tta])
        predictions[label] = cached(path, lambda cv_dir=cv_dir, tta=cfg.export.tta: out_of_fold_probabilities(cv_dir, tta))
        print(f"{label}: fold log-loss after temperature {np.mean(fold_losses(predictions, [label])):.4f}", flush=True)
    return trials, predictions, cfg


def tested_ensemble(chosen: list[str], trials: dict, package: str, cfg, quick: bool) -> dict | None:
    """The chosen recipes' fold models exported as one package and its test split scored once (kept, so a rerun scores
    nothing again); None when the default recipe alone was chosen (its fold ensemble is `benchmarks.accuracy_folds`)."""
    import mlflow

    if len(chosen) < 2:
        return None
    mlflow.set_tracking_uri(cfg.tracking.uri)
    out_dir = stage_dir(quick)
    name = f"{package}-quick" if quick else package
    cv_dirs = [out_dir / trials[label]["cv_dir"] for label in chosen]
    path = stage_file(out_dir, "recipes-package", [*(trials[label]["cv_dir"] for label in chosen), cfg.export.tta])
    result = cached(path, lambda: scored_package(cv_dirs, name, cfg.export.tta, cfg.export.models_dir))
    unusual = stage_file(out_dir, "unusual", [result["run_id"], "test"])  # measured after the package's test figures
    result["test_unusual"] = cached(unusual, lambda: unusual_on_test(Path(result["package"])))
    return result


def out_of_fold_probabilities(cv_dir: Path, tta: str) -> dict:
    """Each held-out image of a cross-validation scored by the fold model that held it out, with the served views:
    {rows, labels, folds, p} in row order (p: the probability of the positive class)."""
    from medtriage.evaluation.calibration import probabilities
    from medtriage.export.fold_ensemble import fold_members, out_of_fold

    joined, _, parts = out_of_fold(fold_members(cv_dir), tta)
    folds = np.concatenate([np.full(len(part.labels), k) for k, part in enumerate(parts)])
    order = np.argsort(joined.row_indices)
    return {
        "rows": joined.row_indices[order].tolist(),
        "labels": joined.labels[order].tolist(),
        "folds": folds[order].tolist(),
        "p": probabilities(joined.logits, 1.0)[order, 1].tolist(),
    }


def per_fold(predictions: dict[str, dict], labels: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fold, the mean of `labels`' probabilities on its held-out images, and their labels."""
    first = predictions[labels[0]]
    if any(predictions[label]["rows"] != first["rows"] or predictions[label]["folds"] != first["folds"] for label in labels):
        raise RuntimeError(f"the cross-validations of {', '.join(labels)} hold out different images: they are not cut alike")
    p = np.mean([predictions[label]["p"] for label in labels], axis=0)
    folds, y = np.asarray(first["folds"]), np.asarray(first["labels"])
    return [(p[folds == k], y[folds == k]) for k in sorted(set(first["folds"]))]


def fold_losses(predictions: dict[str, dict], labels: list[str]) -> list[float]:
    """Per fold, the held-out log-loss after a cross-fitted temperature of the mean of `labels`' probabilities."""
    from medtriage.evaluation.calibration import cross_fitted_log_loss

    return [
        float(cross_fitted_log_loss(np.log(np.clip(np.stack([1.0 - p, p], axis=1), 1e-12, 1.0)), y))
        for p, y in per_fold(predictions, labels)
    ]


def fold_aucs(predictions: dict[str, dict], labels: list[str]) -> list[float]:
    from sklearn.metrics import roc_auc_score

    return [float(roc_auc_score(y, p)) for p, y in per_fold(predictions, labels)]


def greedy(predictions: dict[str, dict]) -> list[dict]:
    """Forward selection from the first recipe: each step the recipe whose addition gives the lowest mean fold loss,
    kept only when "better" than the ensemble so far beyond the folds' noise; the steps up to the first that is not."""
    chosen = [next(iter(predictions))]
    losses = fold_losses(predictions, chosen)
    steps = [{"added": chosen[0], "losses": losses, "aucs": fold_aucs(predictions, chosen), "gain": None, "standing": "start"}]
    while remaining := [label for label in predictions if label not in chosen]:
        tried = {label: fold_losses(predictions, [*chosen, label]) for label in remaining}
        best = min(tried, key=lambda label: np.mean(tried[label]))
        gain = paired_gain(np.asarray(losses), np.asarray(tried[best]))
        standing = compared(*gain)
        steps.append(
            {"added": best, "losses": tried[best], "aucs": fold_aucs(predictions, [*chosen, best]), "gain": gain, "standing": standing}
        )
        if standing != "better":
            break
        chosen.append(best)
        losses = tried[best]
    return steps


def scored_package(cv_dirs: list[Path], name: str, tta: str, models_dir: str) -> dict:
    from medtriage.export.fold_ensemble import export_fold_ensemble

    return scored_export(lambda: export_fold_ensemble(cv_dirs, name, tta=tta, overrides=[f"export.models_dir={models_dir}"]))


def section(
    predictions: dict, trials: dict, steps: list[dict], chosen: list[str], result: dict | None, tta: str, args, command: str
) -> str:
    lines = [
        SECTION,
        "",
        *header(command, f"{machine()}; CPU", "; smoke run (--quick): tiny data, one epoch, figures meaningless" if args.quick else ""),
        f"- recipes: overrides of `python scripts/train.py {' '.join(BASE)}`, each cross-validated on the same {args.folds} "
        "folds of train + validation pooled (test left out of every fold run); each fold model's final weights, not "
        "retrained here, scored on the images it held out with the served views "
        f"({tta}); every recipe's folds hold out the same images",
        "- rule, on the folds alone: greedy forward selection from the default recipe; each step adds the recipe whose fold "
        "models, averaged with the ensemble so far (the mean of the probabilities of the models that held each image "
        "out), give the lowest held-out log-loss after a cross-fitted temperature, and keeps it only if that beats the "
        "ensemble so far by more than one standard error of the paired fold differences; selection stops at the first "
        "step that does not",
        *history_lines(),
        "",
        "Each recipe alone (mean ± sd over folds):",
        "",
        *recipe_table(predictions, trials, RECIPES),
        "",
        *selection_lines(steps, chosen),
        "",
        *(
            test_lines(result, chosen, tta)
            if result
            else ["Nothing beyond the default recipe was chosen: its fold ensemble is `## Accuracy: fold ensemble`."]
        ),
    ]
    return "\n".join(lines) + "\n"


def recipe_table(predictions: dict, trials: dict, recipes: dict[str, list[str]]) -> list[str]:
    return [
        "| recipe | overrides | fold log-loss after temperature | fold AUC | MLflow trial run |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | `{' '.join(recipes[label]) or '(as the experiment)'}` | {mean_sd_text(fold_losses(predictions, [label]))} "
            f"| {mean_sd_text(fold_aucs(predictions, [label]))} | `{trials[label]['run_id'][:8]}` |"
            for label in predictions
        ),
    ]


def selection_lines(steps: list[dict], chosen: list[str]) -> list[str]:
    """`greedy`'s steps as a table, then what they chose."""
    return ["Selection:", "", *selection_table(steps), "", f"Chosen: **{' + '.join(chosen)}**."]


def selection_table(steps: list[dict]) -> list[str]:
    """`greedy`'s steps: each ensemble tried, its fold loss and whether its last member was kept."""
    ensemble, rounds = [], []
    for step in steps:
        members = " + ".join([*ensemble, step["added"]])
        kept = step["standing"] in ("start", "better")
        judged = gain_text(step["gain"]) + ("" if kept else " (not added)")
        rounds.append(f"| {members} | {mean_sd_text(step['losses'])} | {judged} | {mean_sd_text(step['aucs'])} |")
        ensemble += [step["added"]] if kept else []
    return [
        "| ensemble | fold log-loss after temperature | gain ± SE over the step before (better: added) | fold AUC |",
        "|---|---|---|---|",
        *rounds,
    ]


def test_lines(r: dict, chosen: list[str], tta: str) -> list[str]:
    seen = (
        "the default recipe's seed packages, its fold ensemble and its refit had been scored on test "
        "(`## Accuracy: selection`, `## Accuracy: fold ensemble`, `## Accuracy: refit`)"
        + (f", and so had {' + '.join(FIRST_TESTED)} (history above)" if tuple(chosen) != FIRST_TESTED else "")
        + "; no other recipe of RECIPES had been"
    )
    return [*package_lines(PACKAGE, r, chosen, tta, seen), *second_look_lines(chosen)]


def package_lines(package: str, r: dict, chosen: list[str], tta: str, seen: str) -> list[str]:
    """The chosen fold models' package (`tested_ensemble`'s result), how test was scored, what had been `seen` on test
    before, and its test table with the verdicts."""
    return [
        f"- package: `python scripts/export_ensemble.py --name {package} --cross-validation <each chosen recipe's folder> "
        f"--tta {tta}` (v{r['version']}, export {r['export_s'] / 60:.1f} min): one ONNX graph averaging all the members over "
        f"the views; temperature ({r['temperature']:.3f}) and thresholds fitted on the {r['out_of_fold_images']} out-of-fold "
        f"scores ({r['out_of_fold_normal']} normal), each image scored by the mean of the {len(chosen)} fold models that held "
        "it out: their scores stand in for the whole ensemble's",
        *unusual_lines(r),
        TEST_SCORING,
        f"- what was seen before: {seen}, and the rule above was fixed before this package was scored",
        "",
        *test_table(f"{' + '.join(chosen)}: ensemble of their {r['members']} fold models", r),
    ]


def second_look_lines(chosen: list[str]) -> list[str]:
    """The verdicts of a package chosen after an earlier choice's test figures were seen are a second look at test."""
    if tuple(chosen) == FIRST_TESTED:
        return []
    return [
        f"- a second look at test: {' + '.join(FIRST_TESTED)}, the rule's first choice, was scored on test before the "
        "candidates that changed the choice joined; these verdicts are not those of the first package chosen"
    ]


def history_lines() -> list[str]:
    later = joined_since(list(RECIPES), FIRST_AFTER_TEST)
    if not later:
        return []
    return [
        f"- history: the rule first chose {' + '.join(FIRST_TESTED)} from the recipes listed above {FIRST_AFTER_TEST}, and that "
        f"package was scored on test; {', '.join(later)} joined the candidates afterwards, judged by the same rule on "
        "the folds alone"
    ]


def unusual_on_test(package: Path) -> dict:
    """The package's OOD false-alarm rate as set out-of-fold, and the test images its OOD score flags (it would withhold
    them from a radiologist), in all and per reference label; nothing for a package without an OOD score."""
    import json

    from medtriage.serve.scope import UNUSUAL_INPUT

    meta = json.loads((package / "model.json").read_text())
    if "ood" not in meta:
        return {}
    document = served_document(package, "test")
    flagged = [document["labels"][r["file"]] for r in document["results"] if UNUSUAL_INPUT in r["flags"]]
    return {
        "flagged": len(flagged),
        "images": len(document["results"]),
        "false_alarm_rate": meta["ood"]["false_alarm_rate"],
        "flagged_by_label": {name: flagged.count(k) for k, name in enumerate(meta["label_names"])},
    }


def unusual_lines(r: dict) -> list[str]:
    """The OOD score's false alarms on test: new chest X-rays of the same kind, which it should pass."""
    measured = r.get("test_unusual") or {}
    if not measured:
        return []
    flagged, images = measured["flagged"], measured["images"]
    return [
        f"- OOD score: thresholded to flag {measured['false_alarm_rate']:.0%} of the out-of-fold images as unusual; it flags "
        f"{flagged} of the {images} test images ({flagged / images:.1%}; "
        + ", ".join(f"{count} {label}" for label, count in measured["flagged_by_label"].items())
        + "), which are chest X-rays like the training images: on this test set the served false-alarm rate is the latter "
        "(measured after the test figures above, with the same package; test chose nothing)"
    ]


if __name__ == "__main__":
    raise SystemExit(main())
