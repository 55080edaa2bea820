"""Fixtures for training tests: a tiny budget, isolated outputs, and a shared PneumoniaMNIST pool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made once (creating them takes seconds)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch, empty_mlflow_db):
    """Each test still gets its own store (a copy of the empty one), as in tests/conftest.py."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_mlflow_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # in-process runs set mlflow's global URI; no test inherits an earlier test's store
    yield


@pytest.fixture(scope="session")
def npz_cache_dir(tmp_path_factory) -> Path:
    """A pool cache folder shared by the session (the npz pool is built once, by the first run)."""
    return tmp_path_factory.mktemp("pools")


@pytest.fixture
def tiny_overrides(tmp_path, npz_cache_dir) -> list[str]:
    """PneumoniaMNIST, 128 images per split, ResNet-10 at 28 px, one thread: a few seconds per epoch."""
    return tiny_recipe(tmp_path / "outputs", npz_cache_dir)


def tiny_recipe(runs_dir: Path, npz_cache_dir: Path) -> list[str]:
    """The overrides of `tiny_overrides`, with runs kept under `runs_dir`."""
    return [
        "experiment=pneumoniamnist",
        "model=resnet10",
        "model.preprocess.size=28",
        "data.limit=128",
        "data.batch_size=32",
        "trainer.num_threads=1",
        "trainer.max_epochs=1",
        "trainer.warmup_epochs=0.25",
        "export.enabled=false",
        f"paths.cache_dir={npz_cache_dir}",
        f"paths.runs_dir={runs_dir}",
    ]


def _run_train(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise AssertionError(f"train.py failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


@pytest.fixture
def run_train():
    """`python scripts/train.py <overrides>` in a subprocess, as a user would run it."""
    return _run_train


@pytest.fixture
def tracking_uri() -> str:
    return os.environ["MLFLOW_TRACKING_URI"]  # set per test by tests/conftest.py
