"""The `## Accuracy` section of docs/benchmarks.md, written from `accuracy_benchmark.run_benchmark`'s result."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

from medtriage.benchmarking import machine
from medtriage.training.accuracy_benchmark import NPZ
from medtriage.training.uncertainty import mean_sd

SECTION = "## Accuracy"
# MedMNIST v2 paper, PneumoniaMNIST test split (as copied in ../shared/data/README.md).
PUBLISHED = (("ResNet-18 (28)", 0.944, 0.854), ("ResNet-18 (224)", 0.956, 0.864), ("ResNet-50 (28)", 0.948, 0.854),
             ("ResNet-50 (224)", 0.962, 0.884), ("auto-sklearn", 0.942, 0.855), ("AutoKeras", 0.947, 0.878),
             ("Google AutoML Vision", 0.991, 0.946))
CITATION = ("Yang et al., \"MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image "
            "classification\", Scientific Data 2023")
COLUMNS = ("test_auc", "test_acc", "test_sens_sens95", "test_spec_sens95", "test_sens_youden", "test_spec_youden", "test_acc_youden")


def _cell(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.3f} ± {sd:.3f}" if len(values) > 1 else f"{mean:.3f}"


def recipe_line(row) -> str:
    cells = [_cell([a[c] for a in row.assessments]) for c in COLUMNS]
    ci = "; ".join(f"[{a['test_auc_ci_low']:.3f}, {a['test_auc_ci_high']:.3f}]" for a in row.assessments)
    ece = "; ".join(f"{a['test_ece_before']:.3f} → {a['test_ece_after']:.3f}" for a in row.assessments)
    runs = ", ".join(f"`{r[:8]}`" for r in row.run_ids)
    seeds = f" ({len(row.run_ids)} seeds, mean ± sd)" if len(row.run_ids) > 1 else ""
    return f"| {row.label}{seeds} | {cells[0]} | {ci} | {' | '.join(cells[1:])} | {ece} | {_cell([a['val_auc'] for a in row.assessments])} | {runs} |"


def table(result: dict) -> list[str]:
    lines = ["| model | test AUC | 95% CI (bootstrap, per run) | test ACC | sens @ val sens≥0.95 | spec @ val sens≥0.95 "
             "| sens @ val Youden | spec @ val Youden | ACC @ val Youden | test ECE before → after T | val AUC | MLflow run(s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [recipe_line(row) for row in result["rows"]]
    lines += [f"| *published:* {name} | {auc:.3f} | — | {acc:.3f} | — | — | — | — | — | — | — | — |" for name, auc, acc in PUBLISHED]
    return lines


def loso_lines(loso: dict | None) -> list[str]:
    if not loso:
        return []
    lines = ["", "### Leave-one-site-out (3-site DICOM pool)", "", f"Command: `{loso['command']}` (Hydra multirun; parent MLflow "
             f"run `{loso['parent_run_id'][:8]}`). Each job trains on two sites and tests on all images of the third.", "",
             "| held-out site | test AUC |", "|---|---|"]
    lines += [f"| {site} | {value:.3f} |" for site, value in sorted(loso["per_site"].items())]
    if loso["worst"] is not None:
        lines.append(f"| **worst site** | **{loso['worst']:.3f}** |")
    return lines


def section(result: dict, command: str, doc_dir: Path) -> str:
    """The markdown section; the best row's reliability diagram is copied to `<doc_dir>/images/`."""
    proof, rows = result["proof"], result["rows"]
    best = next(r for r in rows if r.label == proof["row"])
    figure = best.reliability[proof["index"]]
    (doc_dir / "images").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure, doc_dir / "images" / figure.name)
    lines = [
        SECTION, "",
        f"- command: `{command}`",
        f"- machine: {machine()}; CPU only",
        f"- date: {date.today().isoformat()}; wall time {result['wall_s'] / 60:.1f} min (training, export, assessment, serving check, leave-one-site-out)",
        "- data: PneumoniaMNIST 28 px from `data/samples/pneumoniamnist_28.npz`, its own splits; test = the official 624 images "
        "(our training split has 388 normal images instead of 1,214, see data/README.md)",
        "- selection: checkpoint by validation AUC; temperature, thresholds (sensitivity ≥ 0.95 and Youden) and the served "
        "package chosen on validation only; ACC is at the calibrated argmax (0.5), as in the published table",
        f"- MLflow: every row is a run in `{result['uri']}` (metrics `bench/*`, reliability diagram under `plots/`)",
        "",
        *table(result),
        "",
        f"Published rows: {CITATION}.",
        "",
        f"Served check: `medtriage score {proof['package']} --npz {NPZ} --split test --json` "
        f"scored {proof['images']} images through the package's ONNX session: test AUC {proof['served_test_auc']:.6f} vs "
        f"{proof['torch_test_auc']:.6f} from PyTorch (|diff| {abs(proof['served_test_auc'] - proof['torch_test_auc']):.1e}); "
        f"package chosen by validation AUC ({proof['row']}).",
        "",
        f"![reliability diagram, test split, before and after temperature scaling](images/{figure.name})",
        *loso_lines(result["loso"]),
    ]
    return "\n".join(lines) + "\n"


