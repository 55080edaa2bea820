"""Where a run stops and what a resume accepts: a run resumed after it stopped early trains no more, a loss or weights
that are no longer numbers stop the run before it is checkpointed, a resume needs a training checkpoint of as many
processes, not one behind its run's last.pt, and reads the weights of that one alone, the test metrics are filed at the
epoch of the weights tested, and the summary names what chose the best epoch (none in a refit)."""

from __future__ import annotations

import math
import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from medtriage.errors import ConfigError
from medtriage.model.checkpoint import BEST, LAST, read_checkpoint, save_checkpoint
from medtriage.training.distributed import Ranks
from medtriage.training.job import RunResult, check_resume_world_size
from medtriage.training.loop import TrainingDivergedError, TrainState, train_epochs
from medtriage.training.report import log_final, print_summary
from medtriage.training.resume import RESUME_KEYS, find_resume_checkpoint
from tests.training.test_rank_draws_and_resumed_steps import tiny_loop


def test_a_run_resumed_after_it_stopped_early_trains_no_further_epoch(tmp_path):
    fit = tiny_loop(max_epochs=3, early_stopping_patience=1)
    stopped = TrainState(epoch=2, global_step=8, best_val_auc=0.9, best_epoch=1, epochs_since_best=1)  # as last.pt holds it
    assert not train_epochs(fit, stopped, tmp_path, {}, None)
    assert (stopped.epoch, stopped.global_step) == (2, 8)
    assert not (tmp_path / LAST).exists()


def test_a_loss_that_is_no_longer_a_number_stops_the_run_before_its_checkpoint(tmp_path):
    fit = tiny_loop(max_epochs=2, lr=1e30)
    with pytest.raises(TrainingDivergedError) as stopped:
        train_epochs(fit, TrainState(), tmp_path, {}, None)
    assert "epoch 1" in stopped.value.where and "trainer.lr" in stopped.value.hint
    assert not (tmp_path / LAST).exists()  # the diverged weights are not what a resume or an export would continue


def test_weights_that_diverge_on_the_epochs_last_step_stop_a_refit_before_its_checkpoint(tmp_path):
    fit = tiny_loop(max_epochs=1, limit_train_batches=1)  # one step: its loss is of the weights before the step
    del fit.splits["val"]  # a refit: no validation would meet the weights first
    next(fit.model.parameters()).register_hook(lambda grad: grad * math.inf)  # a gradient that overflows
    with pytest.raises(TrainingDivergedError, match="weights") as stopped:
        train_epochs(fit, TrainState(), tmp_path, {}, None)
    assert "epoch 1" in stopped.value.where and "trainer.lr" in stopped.value.hint
    assert not (tmp_path / LAST).exists()


def test_resuming_from_weights_alone_is_refused_with_what_they_lack(tmp_path):
    weights = save_checkpoint(tmp_path / "model.pt", model={"weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="lacks config, epoch.*optimizer") as refused:
        find_resume_checkpoint(str(weights), tmp_path, "exp")
    assert refused.value.where == str(weights) and "last.pt" in refused.value.hint


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    checkpoint = tiny_loop().checkpoint(TrainState(epoch=1), {}, "run")
    path = tmp_path / LAST
    check_resume_world_size(checkpoint, Ranks(0, 1, 0), path)
    check_resume_world_size({}, Ranks(0, 2, 0), path)  # written before the world size was recorded: not known
    with pytest.raises(ConfigError, match="trained by 1 process.*this run has 2") as refused:
        check_resume_world_size(checkpoint, Ranks(0, 2, 0), path)
    assert refused.value.where == str(path)


@pytest.mark.parametrize(("weights", "step"), [("last", 3), ("best", 1)])
def test_test_metrics_are_filed_at_the_epoch_whose_weights_were_tested(tmp_path, weights, step):
    ckpt_dir = tmp_path / "checkpoints"
    for name in (LAST, BEST):
        save_checkpoint(ckpt_dir / name, epoch=0)
    with mlflow.start_run() as run:
        log_final({"test/auc": 0.75}, {}, TrainState(epoch=3, best_epoch=1), ckpt_dir, "steps", False, weights)
    history = MlflowClient().get_metric_history(run.info.run_id, "test/auc")
    assert [point.step for point in history] == [step]


def _bytes_read() -> int:
    """What this process has read from files so far (Linux); a memory map's pages are not counted until touched."""
    with open("/proc/self/io") as io_counts:
        return next(int(line.split()[1]) for line in io_counts if line.startswith("rchar:"))


def _unfinished(run_dir, seed: int, nbytes: int):
    """The last.pt of an interrupted run of `seed` holding `nbytes` of weights (its best epoch is in best.pt already)."""
    fields = dict.fromkeys(RESUME_KEYS, 0) | {"config": {"trainer": {"seed": seed}}, "epoch": 2, "best_epoch": 1}
    return save_checkpoint(run_dir / "checkpoints" / LAST, **fields | {"model": {"weight": torch.zeros(nbytes // 4)}})


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts the bytes read from /proc/self/io (Linux)")
def test_automatic_resume_reads_the_weights_of_the_checkpoint_it_continues_alone(tmp_path):
    size = 8 * 2**20
    chosen = _unfinished(tmp_path / "exp" / "seed0", seed=0, nbytes=size)
    for seed in (1, 2, 3):  # newer runs of other seeds, as a SLURM array's: looked at, refused
        newer = chosen.stat().st_mtime + seed
        os.utime(_unfinished(tmp_path / "exp" / f"seed{seed}", seed, nbytes=size), (newer, newer))

    def fits(contents: dict, path) -> None:
        if contents["config"]["trainer"]["seed"] != 0:
            raise ConfigError("another seed", where=path)

    before = _bytes_read()
    path, _ = find_resume_checkpoint(None, tmp_path, "exp", fits)
    contents = read_checkpoint(path)  # as `job.resume_point` reads the one it continues
    assert path == chosen and contents["model"]["weight"].numel() == size // 4
    assert _bytes_read() - before < 2 * size  # the refused runs' weights were never read


def test_a_checkpoint_of_torchs_older_file_format_still_resumes(tmp_path):
    path = tmp_path / "exp" / "run" / "checkpoints" / LAST
    path.parent.mkdir(parents=True)
    torch.save(dict.fromkeys(RESUME_KEYS, 0) | {"epoch": 2}, path, _use_new_zipfile_serialization=False)
    assert find_resume_checkpoint(None, tmp_path, "exp")[1]["epoch"] == 2


def test_resuming_from_a_checkpoint_behind_its_runs_last_pt_is_refused_naming_both_epochs(tmp_path):
    """best.pt holds an earlier epoch's training state: continued, it would train again epochs whose metrics the MLflow
    run holds already (and keeps, as it keeps an epoch logged before an interruption)."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    fields = dict.fromkeys(RESUME_KEYS, 0)
    last = save_checkpoint(ckpt_dir / LAST, **fields | {"epoch": 3, "best_epoch": 2})
    best = save_checkpoint(ckpt_dir / BEST, **fields | {"epoch": 2, "best_epoch": 2})
    with pytest.raises(ConfigError, match="epoch 2, and the last.pt beside it epoch 3") as refused:
        find_resume_checkpoint(str(best), tmp_path, "exp")
    assert refused.value.where == str(best) and str(last) in refused.value.hint
    assert find_resume_checkpoint(str(last), tmp_path, "exp")[0] == last
    save_checkpoint(ckpt_dir / BEST, **fields | {"epoch": 3, "best_epoch": 3})  # the best epoch is the last one
    assert find_resume_checkpoint(str(best), tmp_path, "exp")[0] == best


def test_automatic_resume_of_a_run_whose_last_pt_is_damaged_says_what_may_continue_it(tmp_path):
    older = _unfinished(tmp_path / "exp" / "older", seed=0, nbytes=64)
    run_dir = tmp_path / "exp" / "newest"
    last = _unfinished(run_dir, seed=0, nbytes=64)
    os.utime(older, (last.stat().st_mtime - 60,) * 2)
    save_checkpoint(run_dir / "checkpoints" / BEST, **dict.fromkeys(RESUME_KEYS, 0) | {"epoch": 1, "best_epoch": 1})
    last.write_bytes(last.read_bytes()[:100])  # cut short by a failing disk
    with pytest.raises(ConfigError, match="the last.pt of an unfinished run cannot be resumed") as refused:
        find_resume_checkpoint(None, tmp_path, "exp")
    assert refused.value.where == str(last)
    assert f"trainer.resume_from={run_dir / 'checkpoints' / BEST}" in refused.value.hint
    assert f"move this run's folder out of {tmp_path / 'exp'}" in refused.value.hint
    assert find_resume_checkpoint(str(run_dir / "checkpoints" / BEST), tmp_path, "exp")[1]["epoch"] == 1


def test_a_run_selected_by_accuracy_says_so_rather_than_calling_it_auc(tmp_path, capsys):
    # a validation split of one class: AUC undefined, the best epoch chosen by accuracy
    metrics = {"val/acc": 0.75, "val/n": 4.0, "best_val_auc": 0.75, "best_epoch": 1.0}
    print_summary(RunResult("run", 0.75, tmp_path / BEST, tmp_path, metrics), "sqlite:///mlflow.db", [])
    printed = capsys.readouterr().out
    assert "best val accuracy 0.7500" in printed and "AUC" not in printed


def test_a_refit_files_no_best_epoch_as_it_chose_none(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    save_checkpoint(ckpt_dir / LAST, epoch=2)
    with mlflow.start_run() as run:
        log_final({}, {}, TrainState(epoch=2), ckpt_dir, "refit", False, "last")  # no validation split: no metrics
    assert "best_epoch" not in MlflowClient().get_run(run.info.run_id).data.metrics
