"""Does stain handling matter? Leave-one-site-out AUC and balanced accuracy on the SYNTHETIC tile
sites: raw stains, Macenko normalisation, or stain augmentation, over several seeds.

    python -m benchmarks.pathology_stains [--epochs 5] [--seeds 2] [--quick] [override ...]

For each seed, held-out site and setting, one `experiment=pathology_tiles` run trains on the other
sites (their patients split train/val) and is tested on every patient of the held-out site. Seed s
sets both the pool (tiles drawn, patients split: data.pool_seed) and the training (trainer.seed).
Runs are tracked in MLflow like any other; export is off. The tables go to the
`## Leave-one-site-out: stain handling` section of docs/pathology.md (--quick: 1 epoch, 1 seed, written
to outputs/pathology_stains_quick.md unless --doc is given).
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, command_line, header, machine, write_section
from medtriage.config import compose_train_config
from medtriage.data.simulate.tiles import SYNTHETIC_SITES
from medtriage.training import run

SECTION = "## Leave-one-site-out: stain handling"
SETTINGS = {  # name -> overrides; augmentation trains on the raw pool
    "raw": [],
    "macenko": ["data.tiles.stain_normalize=true"],
    "stain_augment": ["data.augment.stain_sigma=0.3", "data.augment.stain_bias=0.1"],
}


METRICS = {  # table title -> how to read it from a run's test metrics
    "Test AUC (tile level)": lambda m: m["test/auc"],
    "Balanced accuracy at the 0.5 threshold, (sensitivity + specificity) / 2": lambda m: (
        (m.get("test/sens", np.nan) + m.get("test/spec", np.nan)) / 2
    ),  # nan when a class is missing
}


def held_out_metrics(site: str, setting: str, seed: int, epochs: int, extra: list[str]) -> dict[str, float]:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    overrides = [
        "experiment=pathology_tiles",
        f"data.tiles.holdout_site={site}",
        f"data.pool_seed={seed}",
        f"trainer.seed={seed}",
        f"trainer.max_epochs={epochs}",
        "export.enabled=false",
        *SETTINGS[setting],
        f"name=pathology_loso_{site}_{setting}_s{seed}",
        f"paths.output_dir={ROOT / 'outputs' / 'pathology_loso' / f'{site}_{setting}_s{seed}_{stamp}'}",
        *extra,
    ]
    result = run(compose_train_config(overrides))
    return {title: float(read(result.metrics)) for title, read in METRICS.items()}


def loso_table(epochs: int, seeds: int, extra: list[str]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """metric -> site -> setting -> value per seed. Seeds outermost: each pool is built once per seed."""
    table = {title: {site: {setting: [] for setting in SETTINGS} for site in SYNTHETIC_SITES} for title in METRICS}
    for seed in range(seeds):
        for site in SYNTHETIC_SITES:
            for setting in SETTINGS:
                values = held_out_metrics(site, setting, seed, epochs, extra)
                for title, value in values.items():
                    table[title][site][setting].append(value)
                print(f"seed {seed} held-out {site} {setting}: " + ", ".join(f"{t.split(',')[0]} {v:.3f}" for t, v in values.items()))
    return table


def _cell(values: list[float]) -> str:
    runs = " / ".join(f"{v:.3f}" for v in values)
    return f"{np.mean(values):.3f} ({runs})"


def format_rows(by_site: dict[str, dict[str, list[float]]]) -> list[str]:
    rows = [f"| {site} | " + " | ".join(_cell(by_setting[s]) for s in SETTINGS) + " |" for site, by_setting in by_site.items()]
    means = {s: [np.mean(by_site[site][s]) for site in by_site] for s in SETTINGS}
    rows.append("| **mean over sites** | " + " | ".join(f"**{np.mean(means[s]):.3f}**" for s in SETTINGS) + " |")
    return rows


def best_lines(table: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    """Per metric: the setting with the highest mean over held-out sites, how often each setting beats raw
    stains site by site, and the largest seed-to-seed range at one site (what a difference must exceed)."""
    lines = []
    for title, by_site in table.items():
        means = {s: float(np.mean([np.mean(by_site[site][s]) for site in by_site])) for s in SETTINGS}
        best = max(means, key=means.get)
        wins = {s: sum(np.mean(by_site[site][s]) > np.mean(by_site[site]["raw"]) for site in by_site) for s in SETTINGS if s != "raw"}
        spread = {s: max(np.ptp(by_site[site][s]) for site in by_site) for s in SETTINGS}
        lines.append(
            f"- {title.split(',')[0]}: highest mean over held-out sites with **{best}**; ahead of raw at "
            + ", ".join(f"{n} of {len(by_site)} sites for {s}" for s, n in wins.items())
            + "; largest seed-to-seed range at one site "
            + ", ".join(f"{s} {v:.3f}" for s, v in spread.items())
        )
    return lines + [""]


def format_tables(table: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    lines = []
    for title, by_site in table.items():
        lines += [
            f"{title}:",
            "",
            "| held-out site | " + " | ".join(SETTINGS) + " |",
            "|---" * (len(SETTINGS) + 1) + "|",
            *format_rows(by_site),
            "",
        ]
    return lines


def device_words() -> str:
    import torch

    return f"CUDA ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} torch threads"


def markdown(
    table: dict, epochs: int, seeds: int, command: str, machine_line: str, minutes: tuple[float, float], date: str | None = None
) -> str:
    runs = len(SETTINGS) * len(SYNTHETIC_SITES) * seeds
    return "\n".join(
        [
            SECTION,
            "",
            "Every patient of the held-out SYNTHETIC site is tested after training on the other two. Each cell: mean "
            "over seeds (the runs in brackets); one MLflow run per value. Stain augmentation: "
            "`data.augment.stain_sigma=0.3 data.augment.stain_bias=0.1` on the raw pool. AUC only ranks tiles within the "
            "held-out site, so it does not see a site-wide shift of the scores; balanced accuracy at the fixed 0.5 "
            "threshold shows whether the operating point learnt on the training sites still holds there.",
            "",
            *header(
                command,
                machine_line,
                f"; {minutes[0]:.1f} min wall, {minutes[1]:.1f} min CPU for the {runs} runs ({epochs} epochs, {seeds} seeds)",
                date,
            ),
            "",
            *format_tables(table),
            *best_lines(table),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 1 seed")
    parser.add_argument("--doc", type=Path, default=None, help="default: docs/pathology.md (outputs/ with --quick)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.num_threads=2")
    args = parser.parse_args(argv)
    epochs, seeds = (1, 1) if args.quick else (args.epochs, args.seeds)
    where, started, cpu_started = f"{machine()}; {device_words()}", time.perf_counter(), time.process_time()
    table = loso_table(epochs, seeds, args.overrides)
    minutes = ((time.perf_counter() - started) / 60, (time.process_time() - cpu_started) / 60)
    text = markdown(table, epochs, seeds, command_line(), where, minutes)
    print(text)
    write_section(text, args.doc or ROOT / ("outputs/pathology_stains_quick.md" if args.quick else "docs/pathology.md"))


if __name__ == "__main__":
    main()
