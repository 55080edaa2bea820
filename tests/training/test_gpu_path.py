"""The fast data path: batched device augmentation, the on-disk resized cache, batch gathering,
epoch clock, learning-rate scaling and torch.compile (on CPU here; the same code runs on CUDA)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import medtriage.data.torch.split_cache as split_cache
from medtriage.config import AugmentConfig, TrainerConfig
from medtriage.data.torch.datasets import CachedSplit, cache_split
from medtriage.model.networks import Preprocess, PreprocessSpec
from medtriage.training.augmentation import BatchAugment
from medtriage.training.batch_loader import CachedBatchLoader
from medtriage.training.optimiser import build_optimizer, scaled_lr, training_forward
from medtriage.training.samplers import SiteStratifiedSampler
from medtriage.training.throughput import EpochClock


def _batch(n: int = 8, size: int = 32) -> torch.Tensor:
    ramp = torch.linspace(0, 1, size)
    return (ramp[None, :] * ramp[:, None]).expand(n, 1, size, size).contiguous()


def test_device_augmentation_keeps_shape_and_range_and_is_seeded():
    images = _batch()
    augment = BatchAugment(AugmentConfig(prob=1.0, noise_std=0.05), "cpu", seed=3)
    augment.reseed(epoch=2)
    first = augment(images.clone())
    augment.reseed(epoch=2)
    again = augment(images.clone())
    augment.reseed(epoch=3)
    other = augment(images.clone())
    assert first.shape == images.shape and first.dtype == images.dtype
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)  # same (seed, epoch), same augmentation: resumable
    assert not torch.equal(first, other)
    assert not torch.allclose(first, images, atol=1e-3)
    per_image_change = (first - images).abs().flatten(1).mean(1)
    assert per_image_change.unique().numel() == len(images)  # one draw per image, not one per batch


def test_device_augmentation_geometry_is_a_rotation_not_a_vertical_flip():
    images = _batch(4, 33)
    no_intensity = dict(intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)
    identity = BatchAugment(AugmentConfig(prob=1.0, rotate_deg=0, scale=0, translate=0, **no_intensity), "cpu")
    assert torch.allclose(identity(images.clone()), images, atol=1e-5)
    rotated = BatchAugment(AugmentConfig(prob=1.0, rotate_deg=10, scale=0, translate=0, **no_intensity), "cpu")(images.clone())
    # A small rotation of a ramp that rises to the bottom-right keeps the bright corner there (a flip would not).
    assert (rotated[:, 0, -4:, -4:].mean() > 0.7) and (rotated[:, 0, :4, :4].mean() < 0.1)
    assert BatchAugment(AugmentConfig(enabled=False), "cpu")(images) is images


def test_horizontal_flip_only_when_asked():
    images = _batch(16, 21)
    settings = dict(prob=0.0, intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)
    flipped = BatchAugment(AugmentConfig(hflip=True, **settings), "cpu", seed=0)(images.clone())
    mirrored = torch.flip(images, dims=[-1])
    was_flipped = [torch.allclose(f, m, atol=1e-5) for f, m in zip(flipped, mirrored)]
    kept = [torch.allclose(f, i, atol=1e-5) for f, i in zip(flipped, images)]
    assert any(was_flipped) and any(kept) and all(a != b for a, b in zip(was_flipped, kept))


def test_tone_curve_jitter_bends_each_image_within_its_range_and_leaves_other_runs_draws_alone():
    images = _batch(16, 21) * 0.8 + 0.1  # a ramp from 0.1 to 0.9
    still = dict(rotate_deg=0, scale=0, translate=0, intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)
    bent = BatchAugment(AugmentConfig(prob=1.0, gamma=0.5, **still), "cpu", seed=0)(images.clone())
    assert torch.allclose(bent.amin(dim=(1, 2, 3)), images.amin(dim=(1, 2, 3)), atol=1e-5)  # ends stay
    assert torch.allclose(bent.amax(dim=(1, 2, 3)), images.amax(dim=(1, 2, 3)), atol=1e-5)
    middle = bent[:, 0, 10, 10] - images[:, 0, 10, 10]
    assert (middle > 1e-3).any() and (middle < -1e-3).any()  # powers drawn either side of 1, per image
    # Off (the default), it consumes no random draws: other runs' augmentation is unchanged.
    plain = AugmentConfig(prob=1.0, noise_std=0.05)
    assert torch.equal(
        BatchAugment(plain, "cpu", seed=1)(images.clone()),
        BatchAugment(AugmentConfig(prob=1.0, noise_std=0.05, gamma=0.0), "cpu", seed=1)(images.clone()),
    )


def test_tone_curve_jitter_on_the_cpu_path_is_monai_adjust_contrast():
    from medtriage.data.torch.datasets import gamma_range, train_transforms

    names = [type(t).__name__ for t in train_transforms(AugmentConfig(gamma=0.5), 32).transforms]
    assert "RandAdjustContrast" in names and "RandAdjustContrast" not in [
        type(t).__name__ for t in train_transforms(AugmentConfig(), 32).transforms
    ]
    assert gamma_range(0.5) == (1 / 1.5, 1.5)


def test_the_cpu_augmentation_keeps_pixels_in_the_unit_range_as_the_device_one_does():
    from medtriage.data.torch.datasets import train_transforms

    strong = AugmentConfig(prob=1.0, intensity_shift=0.5, intensity_scale=0.5, noise_std=0.3)
    images = torch.rand(16, 1, 24, 24)
    cpu = torch.stack([torch.as_tensor(train_transforms(strong, 24)(image)) for image in images])
    device = BatchAugment(strong, "cpu")(images.clone())
    assert cpu.min() >= 0 and cpu.max() <= 1 and device.min() >= 0 and device.max() <= 1
    assert (cpu == 0).any() and (cpu == 1).any()  # the jitter did reach past both ends, and was clamped back


def test_resized_split_is_stored_once_and_reused(two_site_pool, monkeypatch):
    preprocess = Preprocess(PreprocessSpec(size=24))
    first = split_cache.persistent_split(two_site_pool, "train", preprocess)
    path = split_cache.cache_path(two_site_pool, "train", preprocess)
    assert path.is_file() and path.parent == two_site_pool.pool_dir / split_cache.CACHE_FOLDER

    def no_resizing(*args, **kwargs):
        raise AssertionError("resized again although the cache holds this split")

    monkeypatch.setattr(split_cache, "cache_split", no_resizing)
    second = split_cache.persistent_split(two_site_pool, "train", preprocess)
    assert torch.equal(first.images, second.images)  # float32 on disk: the same values as a fresh resize
    assert torch.equal(first.labels, second.labels) and (first.sites == second.sites).all()
    assert np.array_equal(first.row_indices, second.row_indices)
    monkeypatch.undo()
    assert torch.equal(second.images, cache_split(two_site_pool, "train", preprocess).images)


def test_cache_key_follows_size_rows_and_pool(two_site_pool):
    small, large = Preprocess(PreprocessSpec(size=24)), Preprocess(PreprocessSpec(size=32))
    paths = {
        split_cache.cache_path(two_site_pool, "train", small),
        split_cache.cache_path(two_site_pool, "train", large),
        split_cache.cache_path(two_site_pool, "val", small),
        split_cache.cache_path(two_site_pool, "train", small, limit=6),
    }
    assert len(paths) == 4


def test_damaged_cache_file_is_rebuilt(two_site_pool):
    preprocess = Preprocess(PreprocessSpec(size=20))
    expected = split_cache.persistent_split(two_site_pool, "val", preprocess).images
    path = split_cache.cache_path(two_site_pool, "val", preprocess)
    path.write_bytes(b"not an array")
    assert torch.equal(split_cache.persistent_split(two_site_pool, "val", preprocess).images, expected)
    assert np.load(path).shape == tuple(expected.shape)


def test_batch_loader_gathers_in_sampler_order_and_drops_the_remainder():
    split = CachedSplit(torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1), torch.arange(10) % 2, np.array(["a"] * 10), np.arange(10))
    order = [9, 3, 5, 0, 1, 2, 4, 6, 7, 8]
    batches = list(CachedBatchLoader(split, 4, torch.device("cpu"), drop_last=True).batches(order))
    assert [b[0].flatten().tolist() for b in batches] == [[9, 3, 5, 0], [1, 2, 4, 6]]
    assert batches[0][1].tolist() == [1, 1, 1, 0]
    kept = list(CachedBatchLoader(split, 4, torch.device("cpu")).batches(order))
    assert sum(len(b[1]) for b in kept) == 10


def test_background_prefetch_delivers_in_order_and_stops_with_its_consumer():
    import threading

    split = CachedSplit(torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1), torch.arange(12), np.array(["a"] * 12), np.arange(12))
    loader = CachedBatchLoader(split, 3, torch.device("cpu"), prefetch=1)
    chunks = [torch.tensor([11, 0, 5]), torch.tensor([1, 2, 3]), torch.tensor([4, 6, 7]), torch.tensor([8, 9, 10])]
    assert [b[1].tolist() for b in loader._prefetched(chunks)] == [c.tolist() for c in chunks]
    before = threading.active_count()
    stream = loader._prefetched(chunks)
    next(stream)
    stream.close()  # a consumer that stops early (limit_train_batches) must not leave a blocked producer
    assert threading.active_count() == before


def test_epoch_clock_names_what_it_measured_on_cpu():
    clock = EpochClock(torch.device("cpu"))
    clock.step_begins()
    torch.randn(200, 200) @ torch.randn(200, 200)
    clock.step_ends(images=8)
    figures = clock.summary()
    assert "train/gpu_busy_fraction" not in figures
    assert 0 < figures["train/cpu_compute_fraction"] <= 1
    assert figures["train/images_per_s"] > 0 and figures["train/data_wait_s"] >= 0


def test_site_stratified_shards_cover_the_epoch_and_keep_the_site_mix():
    sites = np.array(["a"] * 60 + ["b"] * 30 + ["c"] * 10)
    shards = [SiteStratifiedSampler(sites, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for sampler in shards:
        sampler.set_epoch(3)
    orders = [list(sampler) for sampler in shards]
    assert len(orders[0]) == len(orders[1]) == 50 and sorted(orders[0] + orders[1]) == list(range(100))
    for order in orders:
        for start in range(0, 50, 10):  # a batch of 10 on one rank: sites in proportion 6:3:1, give or take one
            counts = {site: int((sites[order[start : start + 10]] == site).sum()) for site in "abc"}
            assert abs(counts["a"] - 6) <= 1 and abs(counts["b"] - 3) <= 1 and abs(counts["c"] - 1) <= 1, counts
    again = SiteStratifiedSampler(sites, num_replicas=2, rank=0, seed=5)
    again.set_epoch(3)
    assert list(again) == orders[0]
    again.set_epoch(4)
    assert list(again) != orders[0]


def test_learning_rate_scales_with_the_global_batch():
    trainer = TrainerConfig(lr=0.002, lr_reference_batch=256)
    trainer.lr_scaling = "linear"
    assert scaled_lr(trainer, 256, 1) == pytest.approx(0.002)
    assert scaled_lr(trainer, 512, 4) == pytest.approx(0.016)
    trainer.lr_scaling = "sqrt"
    assert scaled_lr(trainer, 256, 4) == pytest.approx(0.004)
    trainer.lr_scaling = "none"
    assert scaled_lr(trainer, 4096, 8) == pytest.approx(0.002)


def test_fused_optimizer_only_on_cuda():
    model = torch.nn.Linear(3, 2)
    assert not build_optimizer(model, 1e-3, 0.0, torch.device("cpu")).defaults["fused"]


def test_compiled_training_step_builds_on_cpu_and_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    # Graph capture of forward and backward as trainer.compile does it; "aot_eager" skips the C++ code
    # generation that takes most of a minute on 2 cores (the benchmark measures the real inductor backend).
    compiled = training_forward(model, compile_model=True, backend="aot_eager")
    images = torch.rand(4, 1, 16, 16)
    compiled(images).sum().backward()
    assert model[0].weight.grad is not None  # the compiled view trains the module's own parameters
    assert torch.allclose(compiled(images), model(images), atol=1e-5)
    assert training_forward(model, compile_model=False) is model


@pytest.mark.gpu
def test_cuda_path_prefetches_pinned_batches_and_times_the_gpu():
    device = torch.device("cuda")
    split = CachedSplit(torch.rand(64, 1, 32, 32), torch.arange(64) % 2, np.array(["a"] * 64), np.arange(64))
    for on_device in (True, False):
        loader = CachedBatchLoader(split, 16, device, on_device=on_device)
        batches = list(loader.batches(torch.randperm(64)))
        assert all(images.is_cuda and labels.is_cuda for images, labels in batches)
    augment = BatchAugment(AugmentConfig(prob=1.0), device, seed=0)
    clock = EpochClock(device)
    for images, _ in batches:
        clock.step_begins()
        out = augment(images)
        clock.step_ends(len(out))
    assert 0 < clock.summary()["train/gpu_busy_fraction"] <= 1


def test_data_wait_is_the_time_before_steps_not_what_follows_the_last_one():
    """On CUDA the epoch's end waits for queued GPU work; that, and logging after the last step, is not data waiting."""
    clock = EpochClock(torch.device("cpu"))
    for _ in range(2):
        time.sleep(0.03)  # the next batch
        clock.step_begins()
        clock.step_ends(images=8)
    time.sleep(0.3)  # after the last step: a synchronisation, validation, logging
    wait = clock.summary()["train/data_wait_s"]
    assert 0.06 <= wait < 0.25
