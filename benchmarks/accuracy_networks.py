"""Other networks as members of the default recipe's ensemble, judged on its folds; writes `## Accuracy: other networks`.

    python -m benchmarks.accuracy_networks [--folds 3] [--quick]

The recipes of `benchmarks.accuracy_recipe_ensemble` all train the default recipe's ResNet-18. A network of another
family makes other mistakes, which is what an ensemble member is for. Each candidate here is the default recipe with
another network of configs/model (`model=<name>`, everything else as the experiment), cross-validated on the same folds
(every recipe's folds hold out the same images), and the rule is the recipe ensemble's: greedy forward selection from
the default recipe on the folds' log-loss after a cross-fitted temperature, a member added only when it beats the
ensemble so far by more than one standard error of the paired fold differences. Only when a network is added is a
package exported and test scored, once. Stage results are kept beside the other accuracy benchmarks' (the default
recipe's cross-validation is shared with them), so a rerun rewrites the section without training or scoring again.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.accuracy_folds import TEST_SCORING, test_table
from benchmarks.accuracy_recipe_ensemble import (
    fold_losses,
    greedy,
    recipe_table,
    recipes_on_folds,
    selection_table,
    tested_ensemble,
    unusual_lines,
)
from benchmarks.accuracy_selection import BASE, INCUMBENT, gain_text
from benchmarks.common import ROOT, command_line, header, machine, verdict, write_section

SECTION = "## Accuracy: other networks"
PACKAGE = "pneumoniamnist-sota-networks"
RECIPES = {  # label -> overrides of the experiment config; the first is the default recipe, where selection starts
    INCUMBENT: [],
    # Dense connectivity (each layer sees every earlier layer's features), the CheXNet network: another family than the
    # residual networks.
    "densenet121": ["model=densenet121"],
}
# Packages scored on test before this benchmark's first choice was, in the sections that say so.
SEEN_BEFORE = (
    "the default recipe's seed packages, its fold ensemble, its refit and the recipe ensembles had been scored on test "
    "(`## Accuracy: selection`, `## Accuracy: fold ensemble`, `## Accuracy: refit`, `## Accuracy: recipe ensemble`)"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 images per split, one epoch of each fold")
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args(argv)
    trials, predictions, cfg = recipes_on_folds(RECIPES, args.folds, args.quick)
    steps = greedy(predictions)
    chosen = [step["added"] for step in steps if step["standing"] in ("start", "better")]
    result = tested_ensemble(chosen, trials, PACKAGE, cfg, args.quick)
    doc = args.doc or ROOT / ("outputs/benchmark_accuracy_networks_quick.md" if args.quick else "docs/benchmarks.md")
    write_section(section(predictions, trials, steps, chosen, result, cfg.export.tta, args, command_line()), doc)
    print(f"written to {doc}")
    return 0


def section(
    predictions: dict, trials: dict, steps: list[dict], chosen: list[str], result: dict | None, tta: str, args, command: str
) -> str:
    quick = "; smoke run (--quick): tiny data, one epoch, figures meaningless" if args.quick else ""
    lines = [
        SECTION,
        "",
        *header(command, f"{machine()}; CPU, 1 torch thread per fold run", quick),
        f"- candidates: `python scripts/cross_validate.py {' '.join(BASE)} model=<network> cv.folds={args.folds}`, the "
        "default recipe with another network of configs/model, everything else as the experiment; each cross-validated "
        f"on the same {args.folds} folds of train + validation pooled (test left out of every fold run), each fold "
        f"model's final weights scored on the images it held out with the served views ({tta})",
        "- rule, on the folds alone: that of `## Accuracy: recipe ensemble`: greedy forward selection from the default "
        "recipe, a network added only if the mean of the members' held-out probabilities beats the ensemble so far on "
        "the log-loss after a cross-fitted temperature by more than one standard error of the paired fold differences",
        "",
        "Each network alone (mean ± sd over folds; wall: median minutes per fold run, as kept by the run that trained it, "
        "whose fold runs shared the CPU):",
        "",
        *with_wall(recipe_table(predictions, trials, RECIPES), trials, list(predictions)),
        "",
        "Selection:",
        "",
        *selection_table(steps),
        "",
        f"Chosen: **{' + '.join(chosen)}**.",
        "",
        *(tested_lines(result, chosen, tta) if result else untested_lines(predictions, steps)),
    ]
    return "\n".join(lines) + "\n"


def with_wall(table: list[str], trials: dict, labels: list[str]) -> list[str]:
    """`recipe_table` with each recipe's median minutes per fold run as a last column."""
    minutes = [statistics.median(trials[label]["fold_wall_s"]) / 60 for label in labels]
    return [f"{table[0]} wall (min) |", f"{table[1]}---|", *(f"{row} {m:.1f} |" for row, m in zip(table[2:], minutes))]


def tested_lines(r: dict, chosen: list[str], tta: str) -> list[str]:
    return [
        f"- package: `python scripts/export_ensemble.py --name {PACKAGE} --cross-validation <each chosen network's folder> "
        f"--tta {tta}` (v{r['version']}, export {r['export_s'] / 60:.1f} min): one ONNX graph averaging all the members over "
        f"the views; temperature ({r['temperature']:.3f}) and thresholds fitted on the {r['out_of_fold_images']} out-of-fold "
        f"scores ({r['out_of_fold_normal']} normal), each image scored by the mean of the {len(chosen)} fold models that held "
        "it out",
        *unusual_lines(r),
        TEST_SCORING,
        f"- what was seen before: {SEEN_BEFORE}; no network of RECIPES had been, and the rule above was fixed before this "
        "package was scored",
        "",
        *test_table(f"{' + '.join(chosen)}: ensemble of their {r['members']} fold models", r),
    ]


def untested_lines(predictions: dict, steps: list[dict]) -> list[str]:
    closest = steps[1] if len(steps) > 1 else None
    said = f" (closest: {closest['added']}, gain {gain_text(closest['gain'])})" if closest else ""
    alone = {label: statistics.mean(fold_losses(predictions, [label])) for label in predictions}
    return [
        "No network was added: no package was made, and test was not scored.",
        "",
        "Target: a network that improves the default recipe's fold ensemble as a member.",
        f"- improves it on the folds{said}: {verdict(False)}",
        f"- best network alone on the folds: {min(alone, key=alone.get)}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
