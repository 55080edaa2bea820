"""The PneumoniaMNIST accuracy table; writes `## Accuracy` in docs/benchmarks.md.

    python -m benchmarks.accuracy [--quick] [--threads 1] [--doc docs/benchmarks.md]

Every figure comes from runs made here and logged in MLflow: each recipe (an experiment config)
is trained for its seeds, exported (temperature + operating points on validation), assessed on
test (`medtriage.evaluation.assess`), the seeds of the main recipe and all runs together are packaged
as ensemble graphs, the candidate with the lowest validation log-loss is scored through the served
package (`medtriage score --npz`'s path, ONNX). Leave-one-site-out is `python -m benchmarks.site_generalisation`.
--quick: one short epoch on 64 images per split, written to outputs/benchmark_accuracy_quick.md unless --doc is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np

from benchmarks.common import (
    ROOT,
    command_line,
    header,
    machine,
    mean_sd_text,
    verdict,
    write_section,
)
from medtriage.config import compose_train_config

NPZ = "data/samples/pneumoniamnist_28.npz"
QUICK = ["data.limit=64", "trainer.max_epochs=1", "trainer.warmup_epochs=0.25"]


@dataclass(frozen=True)
class Recipe:
    experiment: str
    seeds: tuple[int, ...]


RECIPES = (Recipe("pneumoniamnist_r10_28", (0, 1, 2, 3, 4)), Recipe("pneumoniamnist_r10_28_mixup", (0, 1, 2)))


@dataclass
class Row:
    """One table row: a recipe's runs (one per seed), or an ensemble package."""

    label: str
    run_ids: list[str]
    assessments: list[dict]
    packages: list[Path]
    reliability: list[Path] = field(default_factory=list)


def choose_package(rows: list[Row]) -> tuple[Row, int]:
    """The row and run to package: lowest validation log-loss at the fitted temperature (log-loss still
    separates candidates whose validation AUCs are all close to 1; the section reports their spread)."""
    candidates = [(a["val_log_loss"], i, j) for i, row in enumerate(rows) for j, a in enumerate(row.assessments)]
    _, i, j = min(candidates)
    return rows[i], j


def train(experiment: str, seed: int, overrides: list[str], out_dir: Path):
    """One training run in this process (the config `scripts/train.py experiment=...` would get)."""
    import medtriage.training

    name = compose_train_config([f"experiment={experiment}"]).export.name
    # Seeds are packaged only when chosen (ensemble or best run): an ONNX export costs minutes on 2 cores.
    cfg = compose_train_config(
        [
            f"experiment={experiment}",
            f"trainer.seed={seed}",
            f"export.name={name}-seed{seed}",
            "export.enabled=false",
            f"paths.output_dir={out_dir / experiment / f'seed{seed}'}",
            *overrides,
        ]
    )
    return medtriage.training.run(cfg)


def assess_network(net, pool_dir: str, run_id: str, name: str, figure_dir: Path, package: Path | None = None) -> tuple[dict, Path]:
    """Test assessment with the temperature fitted on validation (the package's, when there is one);
    metrics (`bench/...`) and the reliability PNG go to `run_id`."""
    from medtriage.data.manifest import load_manifest
    from medtriage.evaluation.assess import assess
    from medtriage.evaluation.calibration import fit_temperature
    from medtriage.evaluation.reliability import plot_reliability
    from medtriage.model.predict import predict

    manifest = load_manifest(pool_dir)
    val, test = predict(net.eval(), manifest, "val"), predict(net, manifest, "test")
    if package is not None:
        temperature = json.loads((package / "model.json").read_text())["calibration"]["temperature"]
    else:
        temperature = fit_temperature(val.logits, val.labels)  # what the export fits, on the same validation logits
    result = assess(val, test, temperature)
    figure = plot_reliability(test.logits, test.labels, temperature, figure_dir / f"reliability_{name}.png", f"{name}: test")
    client = mlflow.MlflowClient()
    for key, value in result.items():
        client.log_metric(run_id, f"bench/{key}", value)
    client.log_artifact(run_id, str(figure), "plots")
    return result, figure


def run_recipe(recipe: Recipe, overrides: list[str], out_dir: Path) -> Row:
    from medtriage.model.checkpoint import load_model

    row = Row(recipe.experiment, [], [], [])
    for seed in recipe.seeds:
        result = train(recipe.experiment, seed, overrides, out_dir)
        net, config = load_model(result.checkpoint)
        assessment, figure = assess_network(net, config["data"]["pool_dir"], result.run_id, f"{recipe.experiment}-seed{seed}", out_dir)
        row.run_ids.append(result.run_id)
        row.assessments.append(assessment)
        row.reliability.append(figure)
    return row


def run_ensemble(members: list[Row], name: str, label: str, out_dir: Path) -> Row:
    """The runs of `members` averaged in one ONNX graph, exported, packaged and assessed like a single run."""
    from medtriage.export.ensemble import export_ensemble

    run_ids = [run_id for row in members for run_id in row.run_ids]
    package, run_id, net = export_ensemble(run_ids, name)
    assessment, figure = assess_network(net, _pool_dir(run_ids[0]), run_id, name, out_dir, package)
    return Row(f"{label}: ensemble of {len(run_ids)} runs (one ONNX graph)", [run_id], [assessment], [package], [figure])


def ensembles(rows: list[Row], out_dir: Path) -> list[Row]:
    """The multi-seed recipe as an ensemble, and every run of every recipe as one. No flip TTA: chest X-rays are not
    left-right symmetric (heart side), so mirrored views are out of distribution for models trained without flips."""
    multi_seed = [r for r in rows if len(r.run_ids) > 1]
    if not multi_seed:
        return []
    main = multi_seed[0]
    built = [run_ensemble([main], f"{_export_name(main.label)}-ens{len(main.run_ids)}", main.label, out_dir)]
    if len(rows) > 1:
        total = sum(len(r.run_ids) for r in rows)
        built.append(run_ensemble(rows, f"pneumoniamnist-all-ens{total}", " + ".join(r.label for r in rows), out_dir))
    return built


def package_best_run(row: Row, index: int) -> Path:
    """Export one run of a recipe (scripts/export.py does the same) when it is the one chosen."""
    from medtriage.export.from_mlflow import export_from_mlflow

    package = export_from_mlflow(row.run_ids[index], [f"export.name={_export_name(row.label)}"])
    row.packages = [package if i == index else None for i in range(len(row.run_ids))]
    return package


def _export_name(experiment: str) -> str:
    return compose_train_config([f"experiment={experiment}"]).export.name


def _pool_dir(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).data.params["data.pool_dir"]


def served_test_auc(package: Path, root: Path) -> tuple[float, int]:
    """Test AUC of what `medtriage score PACKAGE --npz ... --split test` scores: the package's ONNX session."""
    from sklearn.metrics import roc_auc_score

    from medtriage.serve.npz import score_npz
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor

    scores, labels = score_npz(Predictor(load_package(package)), root / NPZ, "test")
    truth = np.asarray([labels[s.file] for s in scores]) == 1  # label 1 = the finding (MedMNIST)
    return float(roc_auc_score(truth, [s.probability for s in scores])), len(scores)


def run_benchmark(quick: bool = False, threads: int = 1, recipes: tuple[Recipe, ...] = RECIPES) -> dict:
    """Train, export, assess and serve every row; returns everything the report needs."""
    root = ROOT
    started = time.perf_counter()
    overrides = [f"trainer.num_threads={threads}", *(QUICK if quick else [])]
    out_dir = root / "outputs" / ("benchmark_accuracy_quick" if quick else "benchmark_accuracy")
    uri = compose_train_config(["experiment=pneumoniamnist"]).tracking.uri
    mlflow.set_tracking_uri(uri)
    rows = [run_recipe(recipe, overrides, out_dir) for recipe in recipes]
    rows += ensembles(rows, out_dir)
    best, best_index = choose_package(rows)  # chosen on validation only
    if not best.packages:
        package_best_run(best, best_index)
    served_auc, served_n = served_test_auc(best.packages[best_index], root)
    proof = {
        "row": best.label,
        "package": str(best.packages[best_index].relative_to(root)),
        "served_test_auc": served_auc,
        "torch_test_auc": best.assessments[best_index]["test_auc"],
        "images": served_n,
        "run_id": best.run_ids[best_index],
        "index": best_index,
    }
    mlflow.MlflowClient().log_metric(proof["run_id"], "bench/served_test_auc", served_auc)
    return {
        "rows": rows,
        "proof": proof,
        "wall_s": time.perf_counter() - started,
        "quick": quick,
        "threads": threads,
        "uri": uri,
        "root": root,
        "device": _device_words(),
    }


def _device_words() -> str:
    import torch

    return f"CUDA ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} torch threads"


# --- the section ------------------------------------------------------------------------------------

SECTION = "## Accuracy"
# MedMNIST v2 paper, PneumoniaMNIST test split (as copied in ../shared/data/README.md).
PUBLISHED = (
    ("ResNet-18 (28)", 0.944, 0.854),
    ("ResNet-18 (224)", 0.956, 0.864),
    ("ResNet-50 (28)", 0.948, 0.854),
    ("ResNet-50 (224)", 0.962, 0.884),
    ("auto-sklearn", 0.942, 0.855),
    ("AutoKeras", 0.947, 0.878),
    ("Google AutoML Vision", 0.991, 0.946),
)
CITATION = (
    'Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image classification", Scientific Data 2023'
)
COLUMNS = ("test_auc", "test_acc", "test_sens_sens95", "test_spec_sens95", "test_sens_youden", "test_spec_youden", "test_acc_youden")


def _cell(values: list[float]) -> str:
    return mean_sd_text(values, digits=3)


def recipe_line(row) -> str:
    cells = [_cell([a[c] for a in row.assessments]) for c in COLUMNS]
    ci = "; ".join(f"[{a['test_auc_ci_low']:.3f}, {a['test_auc_ci_high']:.3f}]" for a in row.assessments)
    ece = "; ".join(f"{a['test_ece_before']:.3f} → {a['test_ece_after']:.3f}" for a in row.assessments)
    runs = ", ".join(f"`{r[:8]}`" for r in row.run_ids)
    seeds = f" ({len(row.run_ids)} seeds, mean ± sd)" if len(row.run_ids) > 1 else ""
    return f"| {row.label}{seeds} | {cells[0]} | {ci} | {' | '.join(cells[1:])} | {ece} | {_cell([a['val_auc'] for a in row.assessments])} | {_cell([a['val_log_loss'] for a in row.assessments])} | {runs} |"


def table(result: dict) -> list[str]:
    lines = [
        "| model | test AUC | 95% CI (bootstrap, per run) | test ACC | sens @ val sens≥0.95 | spec @ val sens≥0.95 "
        "| sens @ val Youden | spec @ val Youden | ACC @ val Youden | test ECE before → after T | val AUC | val log-loss | MLflow run(s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [recipe_line(row) for row in result["rows"]]
    lines += [f"| *published:* {name} | {auc:.3f} | — | {acc:.3f} |{' — |' * 9}" for name, auc, acc in PUBLISHED]
    return lines


SERVED_TOLERANCE = 1e-4  # target: the served package's test AUC equals PyTorch's to this
REFERENCE = PUBLISHED[0]  # target: the packaged model at least matches the published ResNet-18 at the same 28 px


def data_line(proof: dict) -> str:
    with np.load(ROOT / NPZ) as data:
        train = data["train_labels"].reshape(-1)
    return (
        f"- data: PneumoniaMNIST 28 px from `{NPZ}`, its own splits; training split {len(train)} images "
        f"({int((train == 0).sum())} normal; see data/README.md for how it differs from the official split); "
        f"test {proof['images']} images"
    )


def selection_line(rows: list[Row]) -> str:
    val_aucs = [a["val_auc"] for row in rows for a in row.assessments]
    return (
        "- selection: checkpoint by validation AUC; temperature and thresholds (sensitivity ≥ 0.95 and Youden) fitted "
        "on validation; the served package is the candidate with the lowest validation log-loss (validation AUC of the "
        f"{len(val_aucs)} candidates spans {min(val_aucs):.3f}-{max(val_aucs):.3f}); ACC is at the calibrated argmax "
        "(0.5), as in the published table"
    )


def verdict_lines(proof: dict) -> list[str]:
    diff = abs(proof["served_test_auc"] - proof["torch_test_auc"])
    name, auc, _ = REFERENCE
    return [
        f"Targets: served test AUC equal to PyTorch's within {SERVED_TOLERANCE:g}; packaged model's test AUC at least "
        f"the published {name} ({auc:.3f}).",
        f"- served vs PyTorch: |diff| {diff:.1e}: {verdict(diff <= SERVED_TOLERANCE)}",
        f"- packaged model test AUC {proof['torch_test_auc']:.3f}: {verdict(proof['torch_test_auc'] >= auc)}",
    ]


def section(result: dict, command: str, doc_dir: Path) -> str:
    """The markdown section; the best row's reliability diagram is copied to `<doc_dir>/images/`."""
    proof, rows = result["proof"], result["rows"]
    best = next(r for r in rows if r.label == proof["row"])
    figure = best.reliability[proof["index"]]
    (doc_dir / "images").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure, doc_dir / "images" / figure.name)
    lines = [
        SECTION,
        "",
        *header(
            command,
            f"{result['machine']}; {result['device']}",
            f"; wall time {result['wall_s'] / 60:.1f} min (training, export, assessment, serving check)",
        ),
        data_line(proof),
        selection_line(rows),
        f"- MLflow: every row is a run in `{result['uri']}` (metrics `bench/*`, reliability diagram under `plots/`)",
        "",
        *table(result),
        "",
        f"Published rows: {CITATION}.",
        "",
        f"Served check: `medtriage score {proof['package']} --npz {NPZ} --split test` scores {proof['images']} images "
        f"through the package's ONNX session: test AUC {proof['served_test_auc']:.6f} vs {proof['torch_test_auc']:.6f} from "
        f"PyTorch; package chosen by validation log-loss ({proof['row']}, MLflow run `{proof['run_id'][:8]}`).",
        "",
        *verdict_lines(proof),
        "",
        f"![reliability diagram, test split, before and after temperature scaling](images/{figure.name})",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, one epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument(
        "--doc", type=Path, default=None, help="markdown file to update (default: docs/benchmarks.md; outputs/ with --quick)"
    )
    args = parser.parse_args(argv)
    where = machine()
    result = {**run_benchmark(quick=args.quick, threads=args.threads), "machine": where}
    doc = args.doc or ROOT / ("outputs/benchmark_accuracy_quick.md" if args.quick else "docs/benchmarks.md")
    write_section(section(result, command_line(), doc.parent), doc)
    print(f"accuracy table written to {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
