"""Several processes (torchrun) training one model with DistributedDataParallel.

`torchrun --nproc_per_node=N scripts/train.py ...` starts N copies of the same Hydra job. Each
rank trains on its shard of every epoch and evaluates its shard of validation/test; predictions
are gathered so every rank computes the same metrics and takes the same decisions (best epoch,
early stopping). Only rank 0 writes MLflow, checkpoints, plots and the package. Without torchrun
every helper here is a no-op, so one engine serves both cases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from medtriage.errors import MedTriageError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Ranks()  # not under torchrun

RANK_SEED_STRIDE = 1_000_003  # a prime: no (seed, rank) pair of a run meets another rank's seed


def rank_seed(seed: int, ranks: Ranks) -> int:
    """The seed of this rank's random draws (augmentation, loader transforms, dropout). Ranks train different images:
    drawn alike, image i of every rank's shard would get the same flip, affine and noise. Rank 0 keeps `seed`, so a
    run of one process draws as it always has."""
    return seed + RANK_SEED_STRIDE * ranks.rank


def setup(device_choice: str) -> tuple[Ranks, str]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); returns ranks and device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = Ranks(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not ranks.enabled:
        return ranks, device_choice
    cuda = device_choice in ("cuda", "auto") and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    if cuda:
        torch.cuda.set_device(ranks.local_rank)
        return ranks, f"cuda:{ranks.local_rank}"
    return ranks, "cpu"


def teardown(ranks: Ranks) -> None:
    if ranks.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        dist.barrier()


def broadcast(value, ranks: Ranks):
    """Rank 0's value on every rank (paths, run ids: anything picklable)."""
    if not ranks.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class _Failed:
    error: Exception


def from_main(decide: Callable[[], T], ranks: Ranks) -> T:
    """`decide()` run on rank 0 alone (what only it may ask: MLflow), its value on every rank. When it raises, every
    rank raises (a MedTriageError as it is, another named in a RuntimeError), where the others would wait for a value
    that never comes."""
    if not ranks.enabled:
        return decide()
    if not ranks.is_main:
        decided = broadcast(None, ranks)
        if isinstance(decided, _Failed):
            raise decided.error
        return decided
    try:
        value = decide()
    except Exception as error:
        broadcast(_Failed(error if isinstance(error, MedTriageError) else RuntimeError(f"rank 0 failed: {error!r}")), ranks)
        raise
    return broadcast(value, ranks)


def shard(n: int, ranks: Ranks) -> np.ndarray:
    """This rank's positions of `n` items (strided, so every rank gets a similar mix)."""
    return np.arange(ranks.rank, n, ranks.world_size)


def gather_concat(arrays: list[np.ndarray], ranks: Ranks) -> list[np.ndarray]:
    """Each array concatenated over ranks, in rank order (every rank gets the result)."""
    if not ranks.enabled:
        return arrays
    gathered: list = [None] * ranks.world_size
    dist.all_gather_object(gathered, arrays)
    return [np.concatenate([part[i] for part in gathered]) for i in range(len(arrays))]


def sum_over_ranks(values: list[float], ranks: Ranks) -> list[float]:
    if not ranks.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    if not ranks.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def sync_buffers(model: torch.nn.Module, ranks: Ranks) -> None:
    """Rank 0's batch-norm statistics everywhere, so every rank evaluates the same model."""
    if ranks.enabled:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer.data, src=0)
