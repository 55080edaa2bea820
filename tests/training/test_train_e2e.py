"""End to end through `scripts/train.py` (subprocesses), read back from MLflow with MlflowClient."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from medtriage.data.manifest import manifest_hash
from medtriage.model.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"


pytestmark = pytest.mark.slow


def run_id_of(stdout: str) -> str:
    return re.search(r"MLflow run ([0-9a-f]{32})", stdout).group(1)


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def artifact_paths(client: MlflowClient, run_id: str) -> set[str]:
    found, folders = set(), [None]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop()):
            (folders.append(item.path) if item.is_dir else found.add(item.path))
    return found


@pytest.fixture(scope="module")
def tiny_sites(tmp_path_factory):
    """Three DICOM sites made from 240 real X-rays, with the simulator's bad files and label rows."""
    from medtriage.data.simulate.sites import make_sites

    out = tmp_path_factory.mktemp("sites")
    make_sites(ROOT / "data/samples/pneumoniamnist_28.npz", out, seed=0, limit=240)
    return out


def test_site_pool_to_tracked_run(tmp_path, tiny_overrides, tiny_sites, run_train, tracking_uri):
    overrides = [o for o in tiny_overrides if not o.startswith(("experiment=", "paths.cache_dir"))]
    done = run_train(
        [
            "experiment=pneumonia_sites",
            *overrides,
            f"data.sites_dir={tiny_sites}",
            f"paths.cache_dir={tmp_path / 'pools'}",
            "data.limit=null",
        ]
    )
    run_id = run_id_of(done.stdout)
    assert f"mlflow ui --backend-store-uri {tracking_uri}" in done.stdout
    run = MlflowClient(tracking_uri).get_run(run_id)
    client = MlflowClient(tracking_uri)
    assert run.info.status == "FINISHED"

    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.name"] == "resnet10" and params["trainer.max_epochs"] == "1"
    assert params["data.source"] == "sites" and params["data.sites"] == "northgate,riverside,st_marys"
    fingerprint = manifest_hash(tmp_path / "pools" / "pneumonia_sites")
    assert params["data.fingerprint"] == tags["data_fingerprint"] == fingerprint
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"] == (head or "unknown")
    assert tags["data_audit"] == "passed"

    for key in ("train/loss", "train/images_per_s", "val/auc", "val/sens", "val/spec", "val/site/st_marys/acc"):
        assert steps(client, run_id, key) == [1], key
    for split in ("val", "test"):
        sites = {k.split("/")[2] for k in metrics if k.startswith(f"{split}/site/")}
        assert sites == {"northgate", "riverside", "st_marys"}, split
    assert 0.0 <= metrics["test/auc"] <= 1.0 and metrics["best_val_auc"] == max(
        m.value for m in client.get_metric_history(run_id, "val/auc")
    )

    artifacts = artifact_paths(client, run_id)
    assert {
        "config/resolved.yaml",
        "plots/roc.png",
        "plots/site_auc.png",
        "checkpoints/best.pt",
        "metrics.json",
        "data_audit.json",
    } <= artifacts
    resolved = yaml.safe_load(Path(client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path))).read_text())
    assert resolved["data"]["sites_dir"] == str(tiny_sites) and resolved["model"]["preprocess"]["size"] == 28
    best = read_checkpoint(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path)))
    assert best["mlflow_run_id"] == run_id and best["config"] == resolved


def test_multirun_gives_one_parent_and_a_child_per_job(tmp_path, tiny_overrides, run_train, tracking_uri):
    overrides = [o.replace("data.limit=128", "data.limit=64") for o in tiny_overrides if not o.startswith("model=")]
    done = run_train(["-m", "model=resnet10,resnet18", *overrides])
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("medtriage-pneumoniamnist").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.run_id in done.stdout
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.params["model.name"] for c in children) == ["resnet10", "resnet18"]
    assert all(c.info.status == "FINISHED" for c in children + [parent])
    assert parent.data.metrics["jobs"] == 2
    assert parent.data.metrics["best_val_auc"] == max(c.data.metrics["best_val_auc"] for c in children)


def test_interrupted_run_resumes_in_the_same_mlflow_run_and_matches_an_uninterrupted_one(
    tmp_path, tiny_overrides, run_train, run_trains, tracking_uri
):
    budget = [o.replace("data.limit=128", "data.limit=64") for o in tiny_overrides] + ["trainer.max_epochs=2"]
    first, straight = run_trains(  # the uninterrupted run, in a folder of its own, trains meanwhile
        [*budget, "trainer.stop_after_epochs=1"], [o.replace(str(tmp_path / "outputs"), str(tmp_path / "straight")) for o in budget]
    )
    run_id = run_id_of(first.stdout)
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "KILLED"
    last = next((tmp_path / "outputs").glob("pneumoniamnist/*/checkpoints/last.pt"))
    assert read_checkpoint(last)["epoch"] == 1 and steps(client, run_id, "val/auc") == [1]

    resumed = run_train([*budget, "trainer.resume=true"])
    assert run_id_of(resumed.stdout) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "1"
    assert steps(client, run_id, "val/auc") == [1, 2] and read_checkpoint(last)["epoch"] == 2

    other = run_id_of(straight.stdout)
    for key in ("train/loss", "val/auc"):  # seeded on CPU: resuming changes nothing
        assert [m.value for m in client.get_metric_history(other, key)] == [m.value for m in client.get_metric_history(run_id, key)], key


@pytest.mark.gpu
def test_gpu_preset_trains_with_bf16_on_cuda(tmp_path, tiny_overrides, run_train, tracking_uri):
    done = run_train([*tiny_overrides, "trainer=gpu", "data.batch_size=64"])
    run = MlflowClient(tracking_uri).get_run(run_id_of(done.stdout))
    assert run.data.params["trainer.device"] == "cuda" and run.data.params["trainer.precision"] == "bf16"
    assert torch.cuda.is_available() and run.data.metrics["train/images_per_s"] > 0


def test_training_refuses_a_pool_that_fails_the_leakage_audit(tiny_overrides, tracking_uri):
    # The official PneumoniaMNIST splits share identical images between train and val.
    overrides = [*tiny_overrides, "data.allow_audit_failure=false"]
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *overrides], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "same_image_in_two_splits" in done.stderr + done.stdout
    assert "data.allow_audit_failure=true" in done.stderr + done.stdout
    assert not MlflowClient(tracking_uri).search_experiments(filter_string="name = 'medtriage-pneumoniamnist'")
