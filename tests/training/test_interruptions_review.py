"""A training run whose surroundings fail or that is stopped: Ctrl-C ends scripts/train.py with one line and status
130, a run stopped before its first checkpoint does not point at a resume, a checkpoint that cannot be written (a
full disk) and an MLflow store that stops answering mid-run end with one message and keep what was written, and the
temporary file of a checkpoint write killed outright is cleared when the run's folder is taken up again."""

from __future__ import annotations

import errno
import os

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from medtriage import training
from medtriage.errors import MedTriageError
from medtriage.io.safe_output import PARTIAL_SUFFIX, write_atomic
from medtriage.model.checkpoint import LAST, read_checkpoint
from medtriage.training import loop, tracking
from tests.cli.test_cli_bad_inputs import run_hydra_main
from tests.training.test_run_bookkeeping import _tiny

LOCKED = "(sqlite3.OperationalError) database is locked\n[SQL: UPDATE runs SET status=? WHERE runs.run_uuid = ?]"


def _raises(err: BaseException):
    def fail(*args, **kwargs):
        raise err

    return fail


def _only_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


@pytest.mark.parametrize(
    ("module", "work"), [("medtriage.cli.train", "train_and_export"), ("medtriage.cli.cross_validate", "cross_validate")]
)
def test_ctrl_c_ends_a_training_script_with_one_line_and_status_130(tmp_path, monkeypatch, capsys, module, work):
    monkeypatch.setattr(f"{module}.{work}", _raises(KeyboardInterrupt()))
    try:
        code = run_hydra_main(module, ["experiment=pneumoniamnist"], tmp_path, monkeypatch)
    except KeyboardInterrupt:
        pytest.fail(f"the KeyboardInterrupt went on, to end {module} with a traceback")
    assert code == 130
    assert capsys.readouterr().err.startswith("stopped (Ctrl-C")


def test_a_run_stopped_before_its_first_checkpoint_does_not_advise_a_resume(tmp_path, npz_cache_dir, tracking_uri, monkeypatch, capsys):
    """trainer.resume=true continues the newest unfinished run that has a last.pt: another run's, when this one has none."""
    monkeypatch.setattr(loop.TrainingLoop, "epoch", _raises(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        training.run(_tiny(tmp_path, npz_cache_dir, "a"))
    said = capsys.readouterr().out
    assert "trainer.resume=true" not in said and "start it again" in said
    assert _only_run(tracking_uri).info.status == "KILLED"


def _full_disk_on_epoch(epoch: int, monkeypatch) -> None:
    """The save of `epoch`'s last.pt fails halfway, as on a full disk, until `monkeypatch` is told otherwise."""
    save = loop.save_checkpoint

    def save_or_fill(path, **fields):
        if fields["epoch"] != epoch:
            return save(path, **fields)

        def half(file):
            file.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return write_atomic(path, half)

    monkeypatch.setattr(loop, "save_checkpoint", save_or_fill)


def test_a_checkpoint_that_cannot_be_written_ends_the_run_with_one_message_and_keeps_the_one_before(
    tmp_path, npz_cache_dir, tracking_uri, monkeypatch
):
    save_checkpoint = loop.save_checkpoint
    _full_disk_on_epoch(2, monkeypatch)
    with pytest.raises(MedTriageError) as failed:
        training.run(_tiny(tmp_path, npz_cache_dir, "a"))
    ckpt_dir = tmp_path / "outputs" / "pneumoniamnist" / "a" / "checkpoints"
    assert failed.value.where == str(ckpt_dir / LAST)
    assert "epoch 2" in failed.value.reason and os.strerror(errno.ENOSPC) in failed.value.reason
    assert "trainer.resume=true" in failed.value.hint
    assert read_checkpoint(ckpt_dir / LAST)["epoch"] == 1 and not list(ckpt_dir.glob(f".*{PARTIAL_SUFFIX}"))
    assert _only_run(tracking_uri).info.status == "FAILED"
    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)  # space freed
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", "trainer.resume=true"))
    assert resumed.finished and resumed.run_id == _only_run(tracking_uri).info.run_id


def _store_locked_from_epoch(epoch: int, monkeypatch) -> None:
    """The SQLite store held locked by another process from `epoch`'s metrics on, closing the run included."""
    log_metrics = tracking.log_metrics
    locked = MlflowException(LOCKED, error_code=TEMPORARILY_UNAVAILABLE)

    def log_or_fail(metrics, step):
        if step >= epoch:
            monkeypatch.setattr(MlflowClient, "set_terminated", _raises(locked))
            raise locked
        return log_metrics(metrics, step)

    monkeypatch.setattr(tracking, "log_metrics", log_or_fail)


def test_an_mlflow_store_that_stops_answering_mid_run_ends_it_with_one_message(tmp_path, npz_cache_dir, tracking_uri, monkeypatch):
    _store_locked_from_epoch(2, monkeypatch)
    with pytest.raises(MedTriageError) as failed:
        training.run(_tiny(tmp_path, npz_cache_dir, "a"))
    assert failed.value.where == "tracking.uri" and tracking_uri in failed.value.reason
    assert "database is locked" in failed.value.reason and "[SQL" not in failed.value.reason
    assert "trainer.resume=true" in failed.value.hint
    assert mlflow.active_run() is None
    ckpt_dir = tmp_path / "outputs" / "pneumoniamnist" / "a" / "checkpoints"
    assert read_checkpoint(ckpt_dir / LAST)["epoch"] == 1


def test_ctrl_c_while_the_mlflow_store_is_locked_stays_an_interruption(tmp_path, npz_cache_dir, monkeypatch):
    """Closing the run KILLED fails too: that failure must not replace the Ctrl-C (a traceback, status 1, not 130)."""
    epoch = loop.TrainingLoop.epoch

    def ctrl_c_on_epoch_2(fit, number, state):
        if number == 2:
            monkeypatch.setattr(MlflowClient, "set_terminated", _raises(MlflowException(LOCKED, error_code=TEMPORARILY_UNAVAILABLE)))
            raise KeyboardInterrupt
        return epoch(fit, number, state)

    monkeypatch.setattr(loop.TrainingLoop, "epoch", ctrl_c_on_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        training.run(_tiny(tmp_path, npz_cache_dir, "a"))
    assert mlflow.active_run() is None


def test_the_temporary_file_of_a_checkpoint_write_killed_outright_goes_when_the_run_resumes(tmp_path, npz_cache_dir):
    """SIGKILL (the OOM killer, a scheduler's last word) mid-save leaves a hidden file as large as a checkpoint."""
    interrupted = training.run(_tiny(tmp_path, npz_cache_dir, "a", "trainer.stop_after_epochs=1"))
    leftover = interrupted.output_dir / f".{LAST}.killed{PARTIAL_SUFFIX}"
    leftover.write_bytes(b"\0" * 4096)
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", "trainer.resume=true"))
    assert resumed.finished and not leftover.exists()
