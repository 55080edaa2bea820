"""Fixtures for training tests: a tiny budget, isolated outputs, and a shared PneumoniaMNIST pool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
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
def _isolated_mlflow(_leaves_no_process_state, tmp_path, monkeypatch, empty_mlflow_db):
    """Each test still gets its own store (a copy of the empty one), and is checked for leaks, as in tests/conftest.py."""
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


def training_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def run_side_by_side(
    commands: list[list[str]], timeout: float = 300, env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess]:
    """`commands` run at once from the project root (a one-thread run leaves a core idle: two runs wait less than one
    after the other), each one's output captured (in files: a full pipe would stall it), all within `timeout`; their results in order."""
    with ExitStack() as stack:
        outputs = [[stack.enter_context(tempfile.TemporaryFile("w+")) for _ in ("stdout", "stderr")] for _ in commands]
        processes = [
            subprocess.Popen(command, cwd=ROOT, env=env or training_env(), stdout=out, stderr=err, text=True)
            for command, (out, err) in zip(commands, outputs, strict=True)
        ]
        deadline = time.monotonic() + timeout
        try:
            for process in processes:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        results = []
        for process, files in zip(processes, outputs, strict=True):
            for file in files:
                file.seek(0)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, *(file.read() for file in files)))
        return results


def build_pool_of(overrides: list[str]) -> None:
    """The pool of the run `overrides` configure, built here: runs started side by side would each build it."""
    from medtriage.config import compose_train_config
    from medtriage.data.sources.registry import build_pool

    build_pool(compose_train_config([*overrides, "paths.output_dir=."]).data)


def _run_trains(*runs: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """`scripts/train.py` once per override list, side by side (each needs its own `paths.runs_dir`: Hydra names a
    run's folder by the second it starts), on a pool built beforehand."""
    if len(runs) > 1:
        build_pool_of(runs[0])
    done = run_side_by_side([[sys.executable, str(TRAIN_SCRIPT), *overrides] for overrides in runs], timeout)
    for each in done:
        if each.returncode != 0:
            raise AssertionError(f"train.py failed ({each.returncode}):\n{each.stdout[-3000:]}\n{each.stderr[-5000:]}")
    return done


def _run_train(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return _run_trains(overrides, timeout=timeout)[0]


@pytest.fixture
def run_train():
    """`python scripts/train.py <overrides>` in a subprocess, as a user would run it."""
    return _run_train


@pytest.fixture
def run_trains():
    """`run_trains(overrides, overrides, ...)`: several `scripts/train.py` runs at once (`_run_trains`)."""
    return _run_trains


@pytest.fixture
def tracking_uri() -> str:
    return os.environ["MLFLOW_TRACKING_URI"]  # set per test by tests/conftest.py
