"""Data-parallel training: images/s of the same run with 1 and with P processes (torchrun + DDP).

    python -m benchmarks.distributed [--processes 1 2] [--global-batch 32] [--limit 512] [--epochs 2]

Each setting is one `torchrun --standalone --nproc_per_node=P scripts/train.py ...` (the launcher is
the only way to start several ranks); its figures are read back from the run's MLflow record
(`train/images_per_s` of the last epoch), in a tracking store of its own. The global batch is the
same for every P (`data.batch_size` = global / P). Scaling efficiency = images/s with P processes /
(P x images/s with one). On CUDA the processes use NCCL, else gloo. The `## Distributed training`
section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from mlflow import MlflowClient

from benchmarks.common import ROOT, command_line, header, machine, publish, verdict

SECTION = "## Distributed training"
TARGET_EFFICIENCY = 0.90  # on GPUs: P processes give at least 90% of P times one process's images/s
EXPERIMENT = "pneumoniamnist"


def overrides(batch: int, limit: int, epochs: int, run_name: str, work: Path, cuda: bool) -> list[str]:
    device = ["trainer=gpu"] if cuda else ["trainer.num_threads=1", "trainer.augment_on=device"]
    return [
        f"experiment={EXPERIMENT}",
        "model=resnet18",
        "model.preprocess.size=64",
        f"data.limit={limit}",
        f"data.batch_size={batch}",
        f"trainer.max_epochs={epochs}",
        *device,
        "export.enabled=false",
        f"tracking.run_name={run_name}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"paths.runs_dir={work / 'outputs'}",
    ]


def train_with(processes: int, global_batch: int, limit: int, epochs: int, work: Path, cuda: bool) -> dict:
    """One torchrun launch; its last epoch's images/s from MLflow."""
    run_name = f"ddp-{processes}-{uuid.uuid4().hex[:8]}"
    args = overrides(global_batch // processes, limit, epochs, run_name, work, cuda)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "scripts/train.py", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"medtriage-{EXPERIMENT}")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    history = sorted(client.get_metric_history(run.info.run_id, "train/images_per_s"), key=lambda m: m.step)
    shown = [
        "torchrun --standalone",
        f"--nproc_per_node={processes}",
        "scripts/train.py",
        *args[:-3],
    ]  # without its run name and temporary paths
    return {
        "processes": processes,
        "batch": global_batch // processes,
        "images_s": history[-1].value,
        "epoch": history[-1].step,
        "run_id": run.info.run_id,
        "command": shlex.join(shown),
    }


def markdown(rows: list[dict], cuda: bool, command: str, machine_line: str) -> str:
    single = rows[0]["images_s"]
    lines = [
        SECTION,
        "",
        *header(command, f"{machine_line}; {'NCCL on CUDA' if cuda else 'gloo on CPU'}"),
        f"- each row: `{rows[0]['command']}` with its own process count (epoch {rows[0]['epoch']}'s `train/images_per_s` "
        "from the run's MLflow record); the same global batch in every row",
        "",
        "| processes | batch per process | images/s | efficiency vs 1 process |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['processes']} | {r['batch']} | {r['images_s']:.0f} | {r['images_s'] / (r['processes'] * single):.0%} |" for r in rows]
    lines += ["", f"Target on GPUs: efficiency ≥ {TARGET_EFFICIENCY:.0%} at every process count."]
    if not cuda:
        lines.append(
            "- not assessed: this run had no CUDA device (CPU processes share the cores, so the figures show that "
            "launch, sharding and gathering work, not how GPUs scale)"
        )
    else:
        lines += [
            f"- {r['processes']} processes: {verdict(r['images_s'] / (r['processes'] * single) >= TARGET_EFFICIENCY)}" for r in rows[1:]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--limit", type=int, default=512, help="images per split (data.limit)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    cuda, where = torch.cuda.is_available(), machine()
    work = Path(tempfile.mkdtemp(prefix="benchmark_distributed_"))
    try:
        rows = [train_with(p, args.global_batch, args.limit, args.epochs, work, cuda) for p in sorted(args.processes)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish(markdown(rows, cuda, command_line(), where))


if __name__ == "__main__":
    main()
