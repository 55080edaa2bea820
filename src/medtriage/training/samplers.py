"""Shuffling that keeps every batch's site mix close to the pool's (`data.site_stratified=true`).

A plain shuffle can put a run of one site's images into a batch by chance, and under torchrun
each rank's shard can lean towards one site for a while; batch-norm statistics and the gradient
then follow that site. Here each site's images are shuffled on their own and spread evenly
through the epoch: each rank is dealt its share of every site, then the k-th of a site's n images
on that rank sits at position (k + offset) / n of the rank's order, so any stretch of it (a batch)
holds the sites in proportion, give or take one image.
Same contract as `torch.utils.data.DistributedSampler`: `set_epoch`, padding to equal shards.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medtriage.errors import ConfigError


class SiteStratifiedSampler(torch.utils.data.Sampler[int]):
    def __init__(self, sites: np.ndarray, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(
                f"rank {rank} is not one of the {num_replicas} processes",
                where="SiteStratifiedSampler",
                hint="pass the world size and this process's rank, as torchrun sets them",
            )
        self.sites = np.asarray(sites)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(self.sites) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self) -> np.ndarray:
        """This rank's order for the epoch: its share of every site, the sites spread evenly through it."""
        rng = np.random.default_rng([self.seed, self.epoch])
        by_site = [rng.permutation(np.flatnonzero(self.sites == site)) for site in np.unique(self.sites)]
        dealt = np.concatenate(by_site)
        # Equal shards, repeating the start as often as needed (fewer images than ranks): a short shard hangs DDP.
        dealt = np.resize(dealt, self.num_samples * self.num_replicas)
        mine = dealt[self.rank :: self.num_replicas]  # dealt site by site: every rank gets each site's share
        keys = np.empty(len(mine))
        for site in np.unique(self.sites[mine]):
            members = np.flatnonzero(self.sites[mine] == site)
            keys[members] = (np.arange(len(members)) + rng.random()) / len(members)  # systematic: evenly spaced
        return mine[np.argsort(keys, kind="stable")]

    def __iter__(self):
        return iter(self.shard().tolist())

    def __len__(self) -> int:
        return self.num_samples
