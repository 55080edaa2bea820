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
    return f"| {row.label}{seeds} | {cells[0]} | {ci} | {' | '.join(cells[1:])} | {ece} | {_cell([a['val_auc'] for a in row.assessments])} | {_cell([a['val_log_loss'] for a in row.assessments])} | {runs} |"


def table(result: dict) -> list[str]:
    lines = ["| model | test AUC | 95% CI (bootstrap, per run) | test ACC | sens @ val sens≥0.95 | spec @ val sens≥0.95 "
             "| sens @ val Youden | spec @ val Youden | ACC @ val Youden | test ECE before → after T | val AUC | val log-loss | MLflow run(s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [recipe_line(row) for row in result["rows"]]
    lines += [f"| *published:* {name} | {auc:.3f} | — | {acc:.3f} |{' — |' * 9}" for name, auc, acc in PUBLISHED]
    return lines


def loso_lines(loso: dict | None) -> list[str]:
    """Per held-out site: test AUC (mean over seeds) without and with per-image intensity harmonisation."""
    if not loso:
        return []
    fixed, harmonised = loso["fixed"], loso["per_image"]
    sites = sorted(fixed[0]["per_site"])
    lines = ["", "### Leave-one-site-out (3-site DICOM pool)", "",
             f"Command: `{fixed[0]['command']}` (a Hydra multirun: one job per held-out site; that site's images are the "
             f"test split), run for seeds {', '.join(str(r['seed']) for r in fixed)}, "
             f"and again with `model.preprocess.intensity=per_image` (each image standardised by its own mean and std "
             f"inside the model, so a site's windowing and detector brightness no longer matter). Test AUC, mean ± sd "
             f"over seeds; parent MLflow runs: fixed {_runs(fixed)}; per-image {_runs(harmonised)}.", "",
             "| held-out site | fixed intensity normalisation | per-image intensity harmonisation |", "|---|---|---|"]
    lines += [f"| {site} | {_cell([r['per_site'][site] for r in fixed])} | {_cell([r['per_site'][site] for r in harmonised])} |"
              for site in sites]
    worst = [[r["worst"] for r in runs] for runs in (fixed, harmonised)]
    lines.append(f"| **worst site** | **{_cell(worst[0])}** | **{_cell(worst[1])}** |")
    return lines


def _runs(results: list[dict]) -> str:
    return ", ".join(f"`{r['parent_run_id'][:8]}`" for r in results)


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
        "- selection: checkpoint by validation AUC; temperature and thresholds (sensitivity ≥ 0.95 and Youden) fitted on "
        "validation; the served package is the candidate with the lowest validation log-loss (validation AUC is saturated "
        "near 1 for every candidate); ACC is at the calibrated argmax (0.5), as in the published table",
        f"- MLflow: every row is a run in `{result['uri']}` (metrics `bench/*`, reliability diagram under `plots/`)",
        "",
        *table(result),
        "",
        f"Published rows: {CITATION}.",
        "",
        f"Served check: `medtriage score {proof['package']} --npz {NPZ} --split test --json` "
        f"scored {proof['images']} images through the package's ONNX session: test AUC {proof['served_test_auc']:.6f} vs "
        f"{proof['torch_test_auc']:.6f} from PyTorch (|diff| {abs(proof['served_test_auc'] - proof['torch_test_auc']):.1e}); "
        f"package chosen by validation log-loss ({proof['row']}, MLflow run `{proof['run_id'][:8]}`).",
        "",
        f"![reliability diagram, test split, before and after temperature scaling](images/{figure.name})",
        *loso_lines(result["loso"]),
    ]
    return "\n".join(lines) + "\n"


