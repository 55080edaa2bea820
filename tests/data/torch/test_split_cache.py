"""Resized splits kept on disk: a file that is not what its key promises is resized again, never trained on."""

import numpy as np
import pytest
import torch

import medtriage.data.torch.split_cache as split_cache
from medtriage.model.networks import Preprocess, PreprocessSpec


def _other_size(path):
    images = np.load(path)
    np.save(path, np.zeros((*images.shape[:2], 7, 7), np.float32))


def _float64(path):
    np.save(path, np.load(path).astype(np.float64))


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b""),  # renamed into place before its bytes reached the disk
        _other_size,
        _float64,
    ],
    ids=["empty", "other_size", "float64"],
)
def test_a_cache_file_that_is_not_the_splits_resized_images_is_rebuilt(two_site_pool, damage):
    preprocess = Preprocess(PreprocessSpec(size=20))
    expected = split_cache.persistent_split(two_site_pool, "val", preprocess).images
    path = split_cache.cache_path(two_site_pool, "val", preprocess)
    damage(path)
    rebuilt = split_cache.persistent_split(two_site_pool, "val", preprocess).images
    assert rebuilt.dtype == torch.float32 and torch.equal(rebuilt, expected)
    stored = np.load(path)
    assert stored.dtype == np.float32 and stored.shape == tuple(expected.shape)
