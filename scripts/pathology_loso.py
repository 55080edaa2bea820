"""Does stain handling matter? Leave-one-site-out AUC on the SYNTHETIC tile sites: raw stains,
Macenko normalisation, or stain augmentation, over several seeds.

    python scripts/pathology_loso.py [--epochs 5] [--seeds 2] [override ...]

For each seed, held-out site and setting, one `experiment=pathology_tiles` run trains on the other
sites (their patients split train/val) and is tested on every patient of the held-out site. Seed s
sets both the pool (tiles drawn, patients split: data.pool_seed) and the training (trainer.seed).
Runs are tracked in MLflow like any other; export is off. The table goes to the
`## Leave-one-site-out: stain handling` section of docs/pathology.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import numpy as np

from medtriage.benchmarking import write_section
from medtriage.config import compose_train_config
from medtriage.data.sources.pathology_tiles import SYNTHETIC_SITES
from medtriage.training import run

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Leave-one-site-out: stain handling"
SETTINGS = {  # name -> overrides; augmentation trains on the raw pool
    "raw": [],
    "macenko": ["data.tiles.stain_normalize=true"],
    "stain_augment": ["data.augment.stain_sigma=0.3", "data.augment.stain_bias=0.1"],
}


def held_out_auc(site: str, setting: str, seed: int, epochs: int, extra: list[str]) -> float:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    overrides = [
        "experiment=pathology_tiles", f"data.tiles.holdout_site={site}", f"data.pool_seed={seed}", f"trainer.seed={seed}",
        f"trainer.max_epochs={epochs}", "export.enabled=false", *SETTINGS[setting],
        f"name=pathology_loso_{site}_{setting}_s{seed}",
        f"paths.output_dir={ROOT / 'outputs' / 'pathology_loso' / f'{site}_{setting}_s{seed}_{stamp}'}", *extra,
    ]
    result = run(compose_train_config(overrides))
    return float(result.metrics["test/auc"])


def loso_table(epochs: int, seeds: int, extra: list[str]) -> dict[str, dict[str, list[float]]]:
    """site -> setting -> test AUC per seed. Seeds outermost: each pool is built once per seed."""
    aucs = {site: {setting: [] for setting in SETTINGS} for site in SYNTHETIC_SITES}
    for seed in range(seeds):
        for site in SYNTHETIC_SITES:
            for setting in SETTINGS:
                aucs[site][setting].append(held_out_auc(site, setting, seed, epochs, extra))
                print(f"seed {seed} held-out {site} {setting}: test AUC {aucs[site][setting][-1]:.3f}")
    return aucs


def _cell(values: list[float]) -> str:
    runs = " / ".join(f"{v:.3f}" for v in values)
    return f"{np.mean(values):.3f} ({runs})"


def format_rows(aucs: dict[str, dict[str, list[float]]]) -> list[str]:
    rows = [f"| {site} | " + " | ".join(_cell(by_setting[s]) for s in SETTINGS) + " |" for site, by_setting in aucs.items()]
    means = {s: [np.mean(aucs[site][s]) for site in aucs] for s in SETTINGS}
    rows.append("| **mean over sites** | " + " | ".join(f"**{np.mean(means[s]):.3f}**" for s in SETTINGS) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "pathology.md")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.num_threads=2")
    args = parser.parse_args()
    started = datetime.datetime.now()
    aucs = loso_table(args.epochs, args.seeds, args.overrides)
    minutes = (datetime.datetime.now() - started).total_seconds() / 60
    command = " ".join(["python scripts/pathology_loso.py", f"--epochs {args.epochs}", f"--seeds {args.seeds}", *args.overrides])
    text = "\n".join([
        SECTION, "",
        "Test AUC (tile level) on every patient of the held-out SYNTHETIC site, after training on the other two. "
        "Each cell: mean over seeds (the runs in brackets); one MLflow run per value. Stain augmentation: "
        "`data.augment.stain_sigma=0.3 data.augment.stain_bias=0.1` on the raw pool.", "",
        f"- command: `{command}`",
        f"- machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (no GPU); {minutes:.1f} min wall for all runs; "
        f"date: {datetime.date.today().isoformat()}",
        "", "| held-out site | " + " | ".join(SETTINGS) + " |", "|---" * (len(SETTINGS) + 1) + "|", *format_rows(aucs), "",
    ])
    print(text)
    write_section(text, args.doc)


if __name__ == "__main__":
    main()
