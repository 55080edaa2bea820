"""A re-export of a finished MLflow run whose checkpoint artifact is not a training's checkpoint: a package error that
names the file and what it lacks, not a KeyError from deep inside."""

from __future__ import annotations

import mlflow
import pytest
import torch

from medtriage.errors import PackageError


@pytest.fixture
def finished_run_with(tmp_path):
    """`make(content)`: the id of a finished run of this test's store whose checkpoints/best.pt holds `content`."""

    def make(content) -> str:
        client = mlflow.MlflowClient()
        run_id = client.create_run(client.create_experiment("checkpoint-checks")).info.run_id
        checkpoint = tmp_path / "best.pt"
        torch.save(content, checkpoint)
        client.log_artifact(run_id, str(checkpoint), "checkpoints")
        client.set_terminated(run_id, "FINISHED")
        return run_id

    return make


def test_a_checkpoint_without_the_runs_config_is_named(finished_run_with):
    from medtriage.export.from_mlflow import export_from_mlflow

    run_id = finished_run_with({"model": {}})  # weights alone, as a bare state_dict save leaves them
    with pytest.raises(PackageError, match="not a training checkpoint: it needs 'model' and 'config'") as refused:
        export_from_mlflow(run_id)
    assert refused.value.where.endswith("best.pt")


def test_a_checkpoint_cut_short_says_what_to_do(tmp_path):
    """Before, it named the file and torch's error, without a hint."""
    from medtriage.model.checkpoint import read_checkpoint

    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, whole)
    cut = tmp_path / "last.pt"
    cut.write_bytes(whole.read_bytes()[:500])
    with pytest.raises(PackageError, match="not a readable checkpoint") as refused:
        read_checkpoint(cut)
    assert refused.value.where == str(cut) and "copy it again" in refused.value.hint
