import numpy as np
import pytest
import torch

from medtriage.config import AugmentConfig
from medtriage.data.sources.registry import load_pool
from medtriage.data.torch.datasets import CachedDataset, cache_split, limit_rows, train_transforms
from medtriage.errors import ConfigError
from medtriage.model.networks import Preprocess, PreprocessSpec


def test_split_is_resized_once_by_the_models_own_resize(two_site_pool):
    preprocess = Preprocess(PreprocessSpec(size=32))
    split = cache_split(two_site_pool, "val", preprocess)
    assert split.images.shape == (16, 1, 32, 32) and set(split.sites) == {"north", "south"}
    i = int(np.flatnonzero(split.sites == "south")[0])
    original = torch.from_numpy(two_site_pool.image(int(split.row_indices[i])))[None]
    assert torch.equal(split.images[i], preprocess.resize(original)[0])
    assert torch.equal(preprocess.resize(split.images[:1]), split.images[:1])  # in-model resize is now identity


def test_limit_keeps_every_site_and_label(two_site_pool):
    rows = limit_rows(two_site_pool.split("train"), 6, seed=0)
    assert len(rows) <= 8 and len(rows.groupby(["site", "label"])) == 4


def test_channel_mismatch_is_a_config_error(two_site_pool):
    with pytest.raises(ConfigError, match="in_channels"):
        cache_split(two_site_pool, "train", Preprocess(PreprocessSpec(size=32, in_channels=3)))


def test_unknown_source_lists_the_known_ones(tmp_path):
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="npz, sites"):
        load_pool(OmegaConf.create({"source": "pacs", "pool_dir": str(tmp_path)}))


def test_augmentation_is_seeded_and_keeps_shape_and_range(two_site_pool):
    split = cache_split(two_site_pool, "train", Preprocess(PreprocessSpec(size=32)))
    augment = AugmentConfig(prob=1.0)

    def first_items(seed):
        dataset = CachedDataset(split, train_transforms(augment, 32))
        dataset.transform.set_random_state(seed)
        return torch.stack([dataset[i][0] for i in range(4)])

    a, b, c = first_items(1), first_items(1), first_items(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 1, 32, 32) and type(a) is torch.Tensor
    assert not torch.equal(a, split.images[:4])
