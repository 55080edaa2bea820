"""A training run whose surroundings fail or that is stopped: Ctrl-C ends scripts/train.py with one line and status
130, a run stopped before its first checkpoint does not point at a resume, a checkpoint that cannot be written (a
full disk) and an MLflow store that stops answering mid-run end with one message and keep what was written, and the
temporary file of a checkpoint write killed outright is cleared when the run's folder is taken up again. A full disk
after the last epoch ends the run with one message, and its resume repeats only the final step; a store that cannot
mark a finished run FINISHED says how to mark it, not to resume it; and a resume copies best.pt only in the held
folder."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from medtriage import training
from medtriage.errors import DataNotFoundError, MedTriageError
from medtriage.evaluation import plots
from medtriage.export.registry import check_finished_run
from medtriage.io.safe_output import PARTIAL_SUFFIX, try_lock, write_atomic
from medtriage.model.checkpoint import BEST, LAST, read_checkpoint
from medtriage.training import loop, report, resume, tracking
from medtriage.training.job import TRAINING_LOCK
from medtriage.training.report import METRICS_FILE
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


def _full_disk_on(module, name: str, monkeypatch) -> None:
    """`module`'s write_atomic fails halfway, as on a full disk, for the file `name` alone."""
    write = module.write_atomic

    def write_or_fill(path, data, *args, **kwargs):
        if Path(path).name != name:
            return write(path, data, *args, **kwargs)

        def half(file):
            file.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return write(path, half)

    monkeypatch.setattr(module, "write_atomic", write_or_fill)


@pytest.mark.parametrize(("module", "name", "where"), [(report, METRICS_FILE, ""), (plots, "roc.png", "plots")])
def test_a_full_disk_after_the_last_epoch_ends_with_one_message_and_a_resume_repeats_only_the_final_step(
    tmp_path, npz_cache_dir, tracking_uri, monkeypatch, module, name, where
):
    write_atomic = module.write_atomic
    _full_disk_on(module, name, monkeypatch)
    with pytest.raises(MedTriageError) as failed:
        training.run(_tiny(tmp_path, npz_cache_dir, "a", "trainer.max_epochs=1"))
    folder = tmp_path / "outputs" / "pneumoniamnist" / "a"
    assert failed.value.where == str(folder / where / name) and os.strerror(errno.ENOSPC) in failed.value.reason
    assert str(folder / "checkpoints") in failed.value.hint and "trainer.resume=true" in failed.value.hint
    assert not (folder / METRICS_FILE).exists() and _only_run(tracking_uri).info.status == "FAILED"
    monkeypatch.setattr(module, "write_atomic", write_atomic)  # space freed; no epoch may train again
    monkeypatch.setattr(loop.TrainingLoop, "epoch", _raises(AssertionError("the resume trained an epoch again")))
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", "trainer.max_epochs=1", "trainer.resume=true"))
    assert resumed.finished and resumed.run_id == _only_run(tracking_uri).info.run_id
    assert (folder / METRICS_FILE).is_file() and (folder / "plots" / "roc.png").is_file()
    assert _only_run(tracking_uri).info.status == "FINISHED"


def test_a_store_that_cannot_mark_a_finished_run_finished_says_how_to_mark_it_not_to_resume_it(
    tmp_path, npz_cache_dir, tracking_uri, monkeypatch
):
    """metrics.json is written: the run is finished on disk and every resume passes its folder over."""
    set_terminated = MlflowClient.set_terminated
    locked = MlflowException(LOCKED, error_code=TEMPORARILY_UNAVAILABLE)

    def locked_on_finished(client, run_id, status=None, *args, **kwargs):
        if status == "FINISHED":
            raise locked
        return set_terminated(client, run_id, status, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", locked_on_finished)
    with pytest.raises(MedTriageError) as failed:
        training.run(_tiny(tmp_path, npz_cache_dir, "a", "trainer.max_epochs=1"))
    monkeypatch.setattr(MlflowClient, "set_terminated", set_terminated)  # the store answers again
    run_id = _only_run(tracking_uri).info.run_id
    assert (tmp_path / "outputs" / "pneumoniamnist" / "a" / METRICS_FILE).is_file()
    assert "trainer.resume" not in failed.value.hint and run_id in failed.value.hint
    with pytest.raises(DataNotFoundError, match="no unfinished run"):  # what the advice must not send people to
        training.run(_tiny(tmp_path, npz_cache_dir, "b", "trainer.max_epochs=1", "trainer.resume=true"))
    (command,) = re.findall(r'python -c "(.+?)"', failed.value.hint)
    subprocess.run([sys.executable, "-c", command], check=True, timeout=120)  # as the advice says
    assert _only_run(tracking_uri).info.status == "FINISHED"
    check_finished_run(run_id)  # what scripts/export.py asks of a run


def test_a_resume_brings_best_pt_up_to_date_only_while_it_holds_the_run_folder(tmp_path, npz_cache_dir, monkeypatch):
    """Two resumes of one run started at once: the one refused by the lock must not have copied meanwhile, as the
    holder clears the folder's temporary files (`claim_checkpoints`), that copy's among them."""
    interrupted = training.run(_tiny(tmp_path, npz_cache_dir, "a", "trainer.stop_after_epochs=1"))
    (interrupted.output_dir / BEST).unlink()  # stopped between last.pt of a better epoch and its copy to best.pt
    copy_atomic, held = resume.copy_atomic, []

    def copy_noting_the_lock(source, path):
        descriptor = os.open(interrupted.output_dir / TRAINING_LOCK, os.O_RDWR)
        try:
            held.append(try_lock(descriptor) is False)
        finally:
            os.close(descriptor)
        return copy_atomic(source, path)

    monkeypatch.setattr(resume, "copy_atomic", copy_noting_the_lock)
    training.run(_tiny(tmp_path, npz_cache_dir, "b", "trainer.resume=true"))
    assert held == [True]
