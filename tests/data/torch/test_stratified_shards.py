"""Training loaders: equal per-rank shards of the site-stratified sampler, seeded per-worker augmentation."""

import numpy as np
import pytest
import torch
from monai import data as monai_data

from medtriage.config import AugmentConfig
from medtriage.data.torch.datasets import CachedDataset, cache_split, train_transforms
from medtriage.errors import ConfigError
from medtriage.model.networks import Preprocess, PreprocessSpec
from medtriage.training.samplers import SiteStratifiedSampler


@pytest.mark.parametrize(("images", "ranks"), [(1, 3), (1, 4), (2, 8), (5, 8)])
def test_site_stratified_shards_stay_equal_when_ranks_outnumber_images(images, ranks):
    # Every rank must step the same number of times, or the others wait forever in the gradient all-reduce.
    sites = np.array(["north", "south"] * images)[:images]
    shards = [list(SiteStratifiedSampler(sites, num_replicas=ranks, rank=r, seed=2)) for r in range(ranks)]
    assert [len(shard) for shard in shards] == [len(SiteStratifiedSampler(sites, ranks, r)) for r in range(ranks)]
    assert {len(shard) for shard in shards} == {1}
    assert sorted(set(sum(shards, []))) == list(range(images))


@pytest.mark.parametrize(("rank", "ranks"), [(2, 2), (-1, 2), (0, 0)])
def test_site_stratified_sampler_refuses_a_rank_outside_the_world(rank, ranks):
    with pytest.raises(ConfigError, match="rank"):
        SiteStratifiedSampler(np.array(["north"] * 8), num_replicas=ranks, rank=rank)


def test_worker_augmentation_is_repeatable_per_epoch_and_differs_between_workers(two_site_pool):
    split = cache_split(two_site_pool, "train", Preprocess(PreprocessSpec(size=16)))
    split.images[:] = 0.5  # identical inputs: any difference between outputs comes from the augmentation draws
    dataset = CachedDataset(split, train_transforms(AugmentConfig(prob=1.0), 16))

    def epoch(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        loader = monai_data.DataLoader(dataset, batch_size=4, shuffle=True, generator=generator, num_workers=2)
        return torch.cat([images for images, _ in loader])

    first = epoch(7)
    assert torch.equal(first, epoch(7)) and not torch.equal(first, epoch(8))
    assert len({tuple(image.flatten().tolist()) for image in first}) == len(first)  # no two workers share draws
