"""Where a run stops and what a resume accepts: a run resumed after it stopped early trains no more, a loss that is no
longer a number stops the run before it is checkpointed, a resume needs a training checkpoint of as many processes, and
the test metrics are filed at the epoch of the weights tested."""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from medtriage.errors import ConfigError
from medtriage.model.checkpoint import BEST, LAST, save_checkpoint
from medtriage.training.distributed import Ranks
from medtriage.training.job import check_resume_world_size
from medtriage.training.loop import TrainingDivergedError, TrainState, train_epochs
from medtriage.training.report import log_final
from medtriage.training.resume import find_resume_checkpoint
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
