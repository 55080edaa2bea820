"""The quick-start demo, timed: the steps `make demo` runs after installation, and the figures it prints.

    python -m benchmarks.demo

Runs, in a temporary folder and through the library: the simulated site exports (`make_sites`), the
de-identifying ingest (`ingest_sites`), training `experiment=pneumonia_sites` (pool, audit, training,
MLflow, export), and scoring a few held-out test files through the exported package. Seconds per
step (in this one process, so without the interpreter start-up the separate commands pay), and the
test AUC overall and per site from the run. The `## Demo` section of docs/benchmarks.md is replaced;
the README points there.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, command_line, header, machine, publish, verdict

SECTION = "## Demo"
NPZ = ROOT / "data" / "samples" / "pneumoniamnist_28.npz"
TARGET_MINUTES = 5.0  # the quick start's steps after installation, on a 2-core CPU


def timed(step, *args, **kwargs):
    started = time.perf_counter()
    result = step(*args, **kwargs)
    return result, time.perf_counter() - started


def demo_config(work: Path):
    """`experiment=pneumonia_sites` as `make demo` trains it, with every file it writes under `work`."""
    from medtriage.config import compose_train_config

    return compose_train_config(
        [
            "experiment=pneumonia_sites",
            f"data.sites_dir={work / 'ingested'}",
            f"data.pool_dir={work / 'pool'}",
            f"paths.runs_dir={work / 'outputs'}",
            f"paths.output_dir={work / 'outputs' / 'demo'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"export.models_dir={work / 'models'}",
        ]
    )


def run_demo(work: Path) -> dict:
    from medtriage.data.pool import split_files
    from medtriage.data.simulate.sites import make_sites
    from medtriage.evaluation.metrics import site_values
    from medtriage.io.ingest import ingest_sites
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor
    from medtriage.workflows.train_and_export import train_and_export

    seconds = {}
    _, seconds["site exports"] = timed(make_sites, NPZ, work / "sites")
    _, seconds["de-identifying ingest"] = timed(ingest_sites, work / "sites", work / "ingested")
    cfg = demo_config(work)
    result, seconds["pool, audit, training, export"] = timed(train_and_export, cfg)
    predictor = Predictor(load_package(result.package))
    files = split_files(work / "pool", "test")  # the files `make demo` scores
    _, seconds[f"scoring {len(files)} test files"] = timed(lambda: [predictor.score_file(f) for f in files])
    return {
        "seconds": seconds,
        "test_auc": result.metrics["test/auc"],
        "sites": site_values(result.metrics, "test"),
        "epochs": cfg.trainer.max_epochs,
        "network": cfg.model.name,
    }


def markdown(result: dict, command: str, machine_line: str) -> str:
    import torch

    total = sum(result["seconds"].values()) / 60
    sites = result["sites"]
    lines = [
        SECTION,
        "",
        *header(command, f"{machine_line}; torch {torch.__version__}"),
        f"- what: the steps of `make demo` after installation, in one process ({result['network']}, {result['epochs']} epochs, seeded)",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| {step} | {s:.0f} |" for step, s in result["seconds"].items()],
        f"| **total** | **{total * 60:.0f}** |",
        "",
        f"Test AUC {result['test_auc']:.3f} overall; per site " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(sites.items())) + ".",
        "",
        f"Target: the demo's steps within {TARGET_MINUTES:g} minutes on a 2-core CPU.",
        f"- {total:.1f} min: {verdict(total <= TARGET_MINUTES)}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    where = machine()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(Path(tmp))
    publish(markdown(result, command_line(), where))


if __name__ == "__main__":
    main()
