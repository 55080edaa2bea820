"""torchrun + DistributedDataParallel on CPU (gloo, 2 processes): same result as one process, one MLflow run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.training.conftest import build_pool_of, run_side_by_side

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def torchrun(nproc: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "scripts" / "train.py"),
        *overrides,
    ]


def run_id_of(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return re.search(r"MLflow run ([0-9a-f]{32})", done.stdout).group(1)


def test_two_ranks_match_one_rank_and_log_one_run(tmp_path, tiny_overrides, tracking_uri):
    # Calm settings so that "within noise" can be tight: no augmentation, a gentle learning rate.
    budget = [o.replace("data.limit=128", "data.limit=256") for o in tiny_overrides if not o.startswith("paths.runs_dir")] + [
        "trainer.max_epochs=2",
        "trainer.lr=0.0003",
        "data.augment.enabled=false",
    ]
    build_pool_of(budget)  # before the two runs start side by side (each in a runs folder of its own)
    one, two = map(
        run_id_of,
        run_side_by_side(
            [
                torchrun(1, [*budget, "data.batch_size=32", f"paths.runs_dir={tmp_path / 'one'}"]),
                torchrun(2, [*budget, "data.batch_size=16", f"paths.runs_dir={tmp_path / 'two'}"]),
            ]
        ),
    )
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("medtriage-pneumoniamnist").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([one, two])  # rank 1 opened no run of its own
    assert client.get_run(two).data.params["data.world_size"] == "2"
    history = {run: [m.step for m in client.get_metric_history(run, "val/auc")] for run in (one, two)}
    assert history == {one: [1, 2], two: [1, 2]}  # one set of metrics, not one per rank
    auc = {run: client.get_run(run).data.metrics["best_val_auc"] for run in (one, two)}
    assert abs(auc[one] - auc[two]) < 0.1, auc
