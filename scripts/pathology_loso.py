"""Does stain normalisation matter? Leave-one-site-out AUC on the SYNTHETIC tile sites, with and without it.

    python scripts/pathology_loso.py [--epochs 4] [override ...]

For each site and each setting (raw / Macenko-normalised) one `experiment=pathology_tiles` run trains
on the other sites (their patients split train/val) and is tested on every patient of the held-out
site. Runs are tracked in MLflow like any other; export is off. The table goes to the `## Pathology:
leave-one-site-out` section of docs/pathology.md.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from medtriage.config import compose_train_config
from medtriage.data.sources.pathology_tiles import SYNTHETIC_SITES
from medtriage.training import run

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Leave-one-site-out: stain normalisation"


def held_out_auc(site: str, normalize: bool, epochs: int, extra: list[str]) -> float:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    overrides = [
        "experiment=pathology_tiles", f"data.tiles.holdout_site={site}", f"data.tiles.stain_normalize={str(normalize).lower()}",
        f"trainer.max_epochs={epochs}", "export.enabled=false",
        f"name=pathology_loso_{site}_{'norm' if normalize else 'raw'}",
        f"paths.output_dir={ROOT / 'outputs' / 'pathology_loso' / f'{site}_{normalize}_{stamp}'}", *extra,
    ]
    result = run(compose_train_config(overrides))
    return float(result.metrics["test/auc"])


def write_section(text: str, doc: Path) -> None:
    old = doc.read_text() if doc.is_file() else "# Pathology\n"
    start = old.find(SECTION + "\n")
    new = old.rstrip("\n") + "\n\n" + text if start < 0 else old[:start] + text
    doc.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "pathology.md")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.num_threads=2")
    args = parser.parse_args()
    rows = []
    for site in SYNTHETIC_SITES:
        raw, norm = (held_out_auc(site, normalize, args.epochs, args.overrides) for normalize in (False, True))
        rows.append(f"| {site} | {raw:.3f} | {norm:.3f} | {norm - raw:+.3f} |")
    command = "python scripts/pathology_loso.py " + " ".join([f"--epochs {args.epochs}", *args.overrides])
    text = "\n".join([
        SECTION, "",
        "Test AUC (tile level) on every patient of the held-out SYNTHETIC site, after training on the other two; "
        "one run per cell, tracked in MLflow.", "",
        f"- command: `{command.strip()}`", f"- date: {datetime.date.today().isoformat()}", "",
        "| held-out site | raw stains | Macenko-normalised | difference |", "|---|---|---|---|", *rows, "",
    ])
    print(text)
    write_section(text, args.doc)


if __name__ == "__main__":
    main()
