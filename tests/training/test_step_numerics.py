"""The numbers a training step computes, on tiny tensors and modules: schedules, EMA, class weighting, sampling,
mixup, batched augmentation, and what every rank of a torchrun job evaluates."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from medtriage.config.schema import (
    AugmentConfig,
    AugmentOn,
    DataConfig,
    Device,
    EmaWarmup,
    Imbalance,
    LrScaling,
    Precision,
    PreprocessSpec,
    Schedule,
    TrainerConfig,
)
from medtriage.data.torch.datasets import CachedSplit
from medtriage.model.networks import Preprocess, TriageNet
from medtriage.training.augmentation import BatchAugment
from medtriage.training.distributed import Ranks
from medtriage.training.ema import WeightEMA
from medtriage.training.loop import TrainingLoop, TrainState
from medtriage.training.losses import Mixup, mixed_loss
from medtriage.training.optimiser import build_scheduler, scaled_lr

SIZE = 8


def tiny_net() -> TriageNet:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    return TriageNet(Preprocess(PreprocessSpec(size=SIZE)), backbone)


def tiny_split(n: int, positives: int, seed: int = 0) -> CachedSplit:
    labels = torch.zeros(n, dtype=torch.int64)
    labels[:positives] = 1
    images = torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return CachedSplit(images, labels, np.array(["a"] * n), np.arange(n))


def tiny_loop(ranks: Ranks | None = None, augment: AugmentConfig | None = None, **trainer) -> TrainingLoop:
    config = TrainerConfig(device=Device.cpu, precision=Precision.fp32, channels_last=False, **trainer)
    data = DataConfig(source="npz", pool_dir="unused", batch_size=8, augment=augment or AugmentConfig())
    splits = {"train": tiny_split(40, 10), "val": tiny_split(12, 4, seed=1)}
    return TrainingLoop(config, data, tiny_net(), splits, torch.device("cpu"), *([ranks] if ranks else []))


def rates_used(trainer: TrainerConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate each optimiser step of the run uses."""
    optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=trainer.lr)
    scheduler = build_scheduler(optimizer, trainer, steps_per_epoch)
    used = []
    for _ in range(trainer.max_epochs * steps_per_epoch):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_cosine_warms_up_over_warmup_epochs_in_steps_then_decays_to_its_floor_at_the_last_step():
    trainer = TrainerConfig(max_epochs=4, lr=0.01, warmup_epochs=0.5, min_lr_ratio=0.1)
    used = rates_used(trainer, steps_per_epoch=10)  # warm-up: 0.5 epoch = 5 steps
    assert used[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])
    assert max(used) == pytest.approx(0.01) and used[5] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(used[5:], used[6:]))
    assert used[-1] == pytest.approx(0.001) and used[-2] > 0.001  # the floor is the last step's rate, not the one after


def test_one_cycle_starts_at_a_25th_of_the_scaled_peak_and_peaks_after_its_share_of_the_steps():
    trainer = TrainerConfig(max_epochs=30, lr=0.002, schedule=Schedule.one_cycle, lr_scaling=LrScaling.linear, lr_reference_batch=256)
    lr = scaled_lr(trainer, 128, world_size=4)
    assert lr == pytest.approx(0.004)
    trainer.lr = lr
    used = rates_used(trainer, steps_per_epoch=7)
    peak = max(range(len(used)), key=used.__getitem__)
    assert used[0] == pytest.approx(lr / 25) and used[peak] == pytest.approx(lr)
    assert peak == round(0.3 * 210) - 1
    assert used[-1] < lr * 1e-4


@pytest.mark.parametrize("rule, factor", [(LrScaling.none, 1.0), (LrScaling.linear, 0.5), (LrScaling.sqrt, math.sqrt(0.5))])
def test_lr_follows_the_global_batch(rule, factor):
    trainer = TrainerConfig(lr=0.001, lr_scaling=rule, lr_reference_batch=256)
    assert scaled_lr(trainer, 64, world_size=2) == pytest.approx(0.001 * factor)


def test_debiased_ema_is_the_bias_corrected_average_and_the_ramp_reaches_its_decay_when_documented():
    model = nn.Linear(3, 1)
    ema, decay, average = WeightEMA(model, 0.9, EmaWarmup.debiased), 0.9, torch.zeros_like(model.weight)
    for n in range(1, 12):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model)
        average = decay * average + (1 - decay) * model.weight
        torch.testing.assert_close(ema.module.weight, average / (1 - decay**n))
    assert WeightEMA(model, 0.99).updates_to_reach_decay() == 890
    assert WeightEMA(model, 0.998).updates_to_reach_decay() == 4490


def test_ema_batch_norm_statistics_follow_the_trained_model():
    model = nn.Sequential(nn.Identity(), nn.BatchNorm1d(2)).train()
    ema = WeightEMA(model, 0.5, EmaWarmup.debiased)
    expected = torch.zeros(2)
    for n in range(1, 4):
        model(torch.randn(16, 2) + 5.0)
        ema.update(model)
        expected = 0.5 * expected + 0.5 * model[1].running_mean
        torch.testing.assert_close(ema.module[1].running_mean, expected / (1 - 0.5**n))
    assert ema.module[1].running_mean.min() > 1.0  # the inputs' mean is 5: not the fresh copy's zeros
    assert int(ema.module[1].num_batches_tracked) == 3


def test_weighted_loss_weighs_the_rarer_class_up_and_the_sampler_draws_classes_equally():
    weighted = tiny_loop()
    torch.testing.assert_close(weighted.criterion.weight, torch.tensor([40 / (2 * 30), 40 / (2 * 10)]))
    for augment_on in AugmentOn:
        balanced = tiny_loop(imbalance=Imbalance.sampler, augment_on=augment_on)
        assert balanced.criterion.weight.tolist() == [1.0, 1.0]
        drawn = collections.Counter()
        for epoch in range(1, 41):
            for _, labels in balanced.loader(epoch):
                drawn.update(labels.tolist())
        assert abs(drawn[1] / (drawn[0] + drawn[1]) - 0.5) < 0.03


def test_mixup_mixes_the_loss_with_the_images_weight():
    mixup = Mixup(0.4, seed=3)
    images, labels = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    batch = mixup(images, labels)
    partner = torch.randperm(6, generator=torch.Generator().manual_seed(3))  # the pairing Mixup(seed=3) draws first
    assert torch.equal(batch.partner_labels, labels[partner]) and 0.0 < batch.lam < 1.0
    torch.testing.assert_close(batch.images, batch.lam * images + (1 - batch.lam) * images[partner])
    logits, criterion = torch.randn(6, 2), nn.CrossEntropyLoss()
    expected = batch.lam * criterion(logits, labels) + (1 - batch.lam) * criterion(logits, labels[partner])
    torch.testing.assert_close(mixed_loss(criterion, logits, batch), expected)


def test_batched_augmentation_applies_each_part_with_the_documented_probability():
    images = torch.rand(4000, 1, SIZE, SIZE) * 0.5 + 0.25
    quiet = dict(rotate_deg=0.0, scale=0.0, translate=0.0, intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)
    for part in ("rotate_deg", "intensity_scale", "intensity_shift", "noise_std"):
        augment = BatchAugment(AugmentConfig(prob=0.3, **{**quiet, part: 10.0 if part == "rotate_deg" else 0.1}), "cpu")
        changed = (augment(images.clone()) - images).abs().amax(dim=(1, 2, 3)) > 1e-6
        assert changed.float().mean().item() == pytest.approx(0.3, abs=0.03), part


def test_evaluation_sees_the_images_unaugmented():
    loop = tiny_loop(augment_on=AugmentOn.device, augment=AugmentConfig(prob=1.0))
    plain = loop.eval_model.eval()
    with torch.no_grad():
        expected = plain(loop.splits["val"].images).numpy()
    np.testing.assert_allclose(loop.predict("val").logits, expected, rtol=1e-6, atol=1e-6)


# --- several ranks -------------------------------------------------------------------------------


def _ema_buffers_of_rank(rank: int, world_size: int, out: str) -> None:
    # A file rendezvous: with tcp://, rank 0 hosts the store, and its exit could abort a rank still tearing down.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        loop = tiny_loop(Ranks(rank, world_size, rank), max_epochs=1, ema_decay=0.9, ema_warmup=EmaWarmup.debiased)
        loop.epoch(1, TrainState())
        torch.save({name: b.clone() for name, b in loop.eval_model.named_buffers()}, f"{out}/rank{rank}.pt")
        dist.barrier()  # neither rank closes its connections while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes start and import torch
def test_every_rank_evaluates_the_same_ema_batch_norm_statistics(tmp_path):
    """Each rank predicts its own shard of validation with its EMA copy: the copies must be one model (rank 0's,
    which is checkpointed), batch-norm statistics included."""
    torch.multiprocessing.spawn(_ema_buffers_of_rank, args=(2, str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert first.keys() == second.keys() and any("running_mean" in name for name in first)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


def test_the_logged_rate_is_the_one_the_epoch_last_used():
    loop = tiny_loop(max_epochs=2, lr=0.01, warmup_epochs=0.0, min_lr_ratio=0.1)
    used = rates_used(loop.trainer, loop.steps_per_epoch)
    state = TrainState()
    logged = [loop.epoch(epoch, state)["train/lr"] for epoch in range(2)]
    assert logged == pytest.approx([used[loop.steps_per_epoch - 1], used[-1]])
