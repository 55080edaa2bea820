"""Random draws of each rank of a torchrun job (rank 0 draws as a single process does), and a resumed run's MLflow
steps (an epoch logged before the interruption is not logged again)."""

from __future__ import annotations

import os
import shutil

import mlflow
import numpy as np
import pytest
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from medtriage.config.schema import AugmentConfig, AugmentOn, DataConfig, Device, Precision, PreprocessSpec, TrainerConfig
from medtriage.data.torch.datasets import CachedSplit
from medtriage.model.checkpoint import LAST, read_checkpoint, save_checkpoint
from medtriage.model.networks import Preprocess, TriageNet
from medtriage.training import tracking
from medtriage.training.distributed import SINGLE_PROCESS, Ranks
from medtriage.training.loop import CheckpointWriteError, TrainingLoop, TrainState, train_epochs

SIZE = 8
FIRST, SECOND = Ranks(0, 2, 0), Ranks(1, 2, 1)


def tiny_net() -> TriageNet:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    return TriageNet(Preprocess(PreprocessSpec(size=SIZE)), backbone)


def tiny_split(n: int, seed: int) -> CachedSplit:
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return CachedSplit(images, labels, np.array(["a"] * n), np.arange(n))


def dropout_net() -> TriageNet:
    """`tiny_net` with dropout: its masks come from torch's global generator."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Dropout(0.5), nn.Linear(2 * (SIZE - 2) ** 2, 2))
    return TriageNet(Preprocess(PreprocessSpec(size=SIZE)), backbone)


def tiny_loop(ranks: Ranks = SINGLE_PROCESS, net=tiny_net, **trainer) -> TrainingLoop:
    config = TrainerConfig(device=Device.cpu, precision=Precision.fp32, channels_last=False, seed=5, **trainer)
    data = DataConfig(source="npz", pool_dir="unused", batch_size=8, augment=AugmentConfig(prob=1.0))
    splits = {"train": tiny_split(32, 0), "val": tiny_split(12, 1)}
    return TrainingLoop(config, data, net(), splits, torch.device("cpu"), ranks)


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: enough to build a rank's loop (DistributedDataParallel needs a group) in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def batch() -> torch.Tensor:
    return torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def device_augmented(loop: TrainingLoop) -> torch.Tensor:
    loop.device_augment.reseed(1)
    return loop.device_augment(batch())


def loader_augmented(loop: TrainingLoop) -> torch.Tensor:
    """One image through the per-image transforms, seeded as the loader of epoch 1 seeds them."""
    loop.loader(1)
    return loop.dataset.transform(batch()[0]).as_tensor()


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("augmented", [device_augmented, loader_augmented], ids=["device", "loader"])
def test_each_rank_augments_with_draws_of_its_own_and_rank_0_as_one_process(augmented):
    augment_on = AugmentOn.device if augmented is device_augmented else AugmentOn.cpu
    single, first, second = (augmented(tiny_loop(ranks, augment_on=augment_on)) for ranks in (SINGLE_PROCESS, FIRST, SECOND))
    torch.testing.assert_close(first, single, rtol=0, atol=0)
    assert not torch.allclose(second, first)


def dropout_mask() -> torch.Tensor:
    return nn.functional.dropout(torch.ones(256), 0.5, training=True)


@pytest.mark.usefixtures("process_group")
def test_dropout_masks_differ_between_ranks_from_one_model_init_and_after_a_resume():
    single, first, second = tiny_loop(), tiny_loop(FIRST), tiny_loop(SECOND)
    torch.testing.assert_close(first.model.module.state_dict(), second.model.module.state_dict(), rtol=0, atol=0)
    masks = {}
    for name, ranks in (("single", SINGLE_PROCESS), ("first", FIRST), ("second", SECOND)):
        tiny_loop(ranks)
        masks[name] = dropout_mask()
    torch.testing.assert_close(masks["first"], masks["single"], rtol=0, atol=0)
    assert not torch.equal(masks["second"], masks["first"])

    checkpoint = single.checkpoint(TrainState(epoch=1), {}, "run")  # written by rank 0: its random state
    first.restore(checkpoint)
    after_first = dropout_mask()
    second.restore(checkpoint)
    assert not torch.equal(dropout_mask(), after_first)


@pytest.mark.usefixtures("process_group")
def test_a_rank_resumed_after_an_epoch_trains_the_next_one_as_the_uninterrupted_rank(tmp_path):
    """Rank 1's dropout draws of epoch 2 depend on (seed, rank, epoch) alone, not on how its process got there."""
    uninterrupted, state = tiny_loop(SECOND, net=dropout_net), TrainState()
    uninterrupted.epoch(1, state)
    state.epoch = 1
    save_checkpoint(tmp_path / LAST, **uninterrupted.checkpoint(state, {}, "run"))
    uninterrupted.epoch(2, state)

    resumed = tiny_loop(SECOND, net=dropout_net)
    resumed_state = resumed.restore(read_checkpoint(tmp_path / LAST))
    resumed.epoch(2, resumed_state)
    torch.testing.assert_close(resumed.model.module.state_dict(), uninterrupted.model.module.state_dict(), rtol=0, atol=0)


def tracking_config():
    uri = os.environ["MLFLOW_TRACKING_URI"]  # this test's own store (tests/training/conftest.py)
    return OmegaConf.create(
        {
            "name": "steps",
            "model": {"name": "tiny", "preprocess": {"size": SIZE}},
            "tracking": {"uri": uri, "experiment_name": "steps", "run_name": None},
        }
    )


def test_an_epoch_logged_before_its_checkpoint_failed_is_not_logged_again_on_resume(tmp_path):
    cfg, ckpt_dir = tracking_config(), tmp_path / "checkpoints"
    run_id = tracking.start_run(cfg).info.run_id
    fit = tiny_loop(max_epochs=2, stop_after_epochs=1)
    state = TrainState()
    assert train_epochs(fit, state, ckpt_dir, {}, run_id)  # epoch 1 logged and checkpointed
    checkpoint = read_checkpoint(ckpt_dir / LAST)
    (ckpt_dir / LAST).unlink()
    (ckpt_dir / LAST / "blocked").mkdir(parents=True)  # the next checkpoint cannot be written
    with pytest.raises(CheckpointWriteError):
        train_epochs(fit, state, ckpt_dir, {}, run_id)  # epoch 2 logged, its checkpoint lost
    mlflow.end_run("FAILED")
    shutil.rmtree(ckpt_dir / LAST)

    resumed = tiny_loop(max_epochs=2)
    state = resumed.restore(checkpoint)
    tracking.start_run(cfg, resume_run_id=run_id)
    assert not train_epochs(resumed, state, ckpt_dir, {}, run_id)  # epoch 2 trained again
    mlflow.end_run("FINISHED")

    steps = [point.step for point in MlflowClient().get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [1, 2]
