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

import statistics

from benchmarks.accuracy_recipe_ensemble import fold_losses, package_lines, recipe_table, run, selection_lines
from benchmarks.accuracy_selection import BASE, INCUMBENT, gain_text
from benchmarks.common import header, machine, verdict

SECTION = "## Accuracy: other networks"
PACKAGE = "pneumoniamnist-sota-networks"
RECIPES = {  # label -> overrides of the experiment config; the first is the default recipe, where selection starts
    INCUMBENT: [],
    # Dense connectivity (each layer sees every earlier layer's features), the CheXNet network: another family than the
    # residual networks. 10 epochs: on a CPU its epoch costs about two of ResNet-18's.
    "densenet121-10-epochs": ["model=densenet121", "trainer.max_epochs=10"],
    # Depthwise-separable inverted residuals with squeeze-excitation (the EfficientNet family), at the recipe's 30 epochs.
    "efficientnet-b0": ["model=efficientnet-b0"],
}
# Packages scored on test before this benchmark's first choice was, in the sections that say so.
SEEN_BEFORE = (
    "the default recipe's seed packages, its fold ensemble, its refit and the recipe ensembles had been scored on test "
    "(`## Accuracy: selection`, `## Accuracy: fold ensemble`, `## Accuracy: refit`, `## Accuracy: recipe ensemble`)"
)


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, RECIPES, PACKAGE, section)


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
        *selection_lines(steps, chosen),
        "",
        *(tested_lines(result, chosen, tta) if result else untested_lines(predictions, steps)),
    ]
    return "\n".join(lines) + "\n"


def with_wall(table: list[str], trials: dict, labels: list[str]) -> list[str]:
    """`recipe_table` with each recipe's median minutes per fold run as a last column."""
    minutes = [statistics.median(trials[label]["fold_wall_s"]) / 60 for label in labels]
    return [f"{table[0]} wall (min) |", f"{table[1]}---|", *(f"{row} {m:.1f} |" for row, m in zip(table[2:], minutes))]


def tested_lines(r: dict, chosen: list[str], tta: str) -> list[str]:
    return package_lines(PACKAGE, r, chosen, tta, f"{SEEN_BEFORE}; no network of RECIPES had been")


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
