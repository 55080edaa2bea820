"""Which run a process trains: one checkpoint folder is trained by one process at a time, and `trainer.resume=true`
continues the newest unfinished run of its own settings, not the newest of the experiment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medtriage import training
from medtriage.config import compose_train_config
from medtriage.errors import ConfigError
from tests.training.conftest import ROOT, tiny_recipe

RECIPE = ("trainer.max_epochs=2", "data.limit=64")


def _tiny(tmp_path: Path, npz_cache_dir: Path, run: str, *extra: str):
    runs = tmp_path / "outputs"
    return compose_train_config([*tiny_recipe(runs, npz_cache_dir), f"paths.output_dir={runs / 'pneumoniamnist' / run}", *RECIPE, *extra])


def _training_in_another_process(tmp_path: Path, npz_cache_dir: Path, run: str) -> subprocess.Popen:
    """A run of `run`'s folder in a process of its own, held at its first epoch until it is stopped."""
    reached = tmp_path / "reached"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from medtriage.config import compose_train_config
        from medtriage.training import job
        from tests.training.conftest import tiny_recipe

        def training(*args, **kwargs):
            Path({str(reached)!r}).touch()
            time.sleep(120)

        job.train_epochs = training
        runs = Path({str(tmp_path / "outputs")!r})
        overrides = [*tiny_recipe(runs, {str(npz_cache_dir)!r}), f"paths.output_dir={{runs / 'pneumoniamnist' / {run!r}}}"]
        job.run(compose_train_config([*overrides, *{list(RECIPE)!r}]))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not reached.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the other run never reached its training: {process.communicate()[1].decode()[-3000:]}")
        time.sleep(0.2)
    return process


def test_a_run_started_into_a_folder_another_process_trains_in_is_refused(tmp_path, npz_cache_dir, tracking_uri):
    """Runs started in the same second get the same Hydra folder (a SLURM array, a script's loop): the second would
    write its checkpoints over the first's."""
    other = _training_in_another_process(tmp_path, npz_cache_dir, "same-second")
    try:
        with pytest.raises(ConfigError) as refused:
            training.run(_tiny(tmp_path, npz_cache_dir, "same-second"))
    finally:
        other.terminate()
        other.wait(timeout=60)
    folder = tmp_path / "outputs" / "pneumoniamnist" / "same-second" / "checkpoints"
    assert refused.value.where == str(folder) and f"process {other.pid}" in refused.value.reason
    assert "hydra.run.dir" in refused.value.hint
    assert not (folder / "last.pt").exists()
    client = MlflowClient(tracking_uri)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1  # the other's alone


def test_resume_continues_the_newest_unfinished_run_of_its_own_settings(tmp_path, npz_cache_dir):
    """A requeued SLURM array task adds trainer.resume=true: it must find its own run, not a newer one of another
    seed of the same experiment."""
    mine = training.run(_tiny(tmp_path, npz_cache_dir, "seed1", "trainer.seed=1", "trainer.stop_after_epochs=1"))
    newer = training.run(_tiny(tmp_path, npz_cache_dir, "seed2", "trainer.seed=2", "trainer.stop_after_epochs=1"))
    assert mine.interrupted and newer.interrupted
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "requeued", "trainer.seed=1", "trainer.resume=true"))
    assert resumed.run_id == mine.run_id and resumed.output_dir == mine.output_dir and resumed.finished
    with pytest.raises(ConfigError, match=r"trainer\.seed: 2 in the checkpoint, 3 now") as refused:  # none fits: the newest says why
        training.run(_tiny(tmp_path, npz_cache_dir, "unknown", "trainer.seed=3", "trainer.resume=true"))
    assert refused.value.where == str(newer.output_dir / "last.pt")


def test_a_resumed_run_records_the_settings_its_later_epochs_ran_with(tmp_path, npz_cache_dir, tracking_uri):
    """The params are the first process's and cannot change: a resume on another precision, device or loader must say
    so in the run, or the run reads as trained alike throughout."""
    interrupted = training.run(_tiny(tmp_path, npz_cache_dir, "a", "trainer.stop_after_epochs=1"))
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", "trainer.resume=true", "trainer.eval_batch_size=64"))
    assert resumed.run_id == interrupted.run_id
    client = MlflowClient(tracking_uri)
    run = client.get_run(interrupted.run_id)
    assert run.data.params["trainer.eval_batch_size"] == "256"  # as the first epoch ran
    changed = run.data.tags["resumed_at_epoch_1"]
    assert "trainer.eval_batch_size: 256 -> 64" in changed and "trainer.resume: False -> True" in changed
    resolved = client.download_artifacts(interrupted.run_id, "config/resumed_at_epoch_1.yaml", str(tmp_path))
    assert "eval_batch_size: 64" in Path(resolved).read_text()
