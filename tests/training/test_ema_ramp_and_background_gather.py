"""Edges of the weight average and the cached batch loader: when the EMA ramp reaches its decay, and a background
gather that fails."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medtriage.data.torch.datasets import CachedSplit
from medtriage.training.batch_loader import CachedBatchLoader
from medtriage.training.ema import WeightEMA


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.998, 0.9995, 0.9999])
def test_the_ramp_reaches_its_decay_at_the_update_it_names_and_not_one_before(decay):
    ema = WeightEMA(torch.nn.Linear(2, 1), decay)
    needed = ema.updates_to_reach_decay()
    ema.updates = needed
    assert ema.current_decay() == decay
    ema.updates = needed - 1
    assert ema.current_decay() < decay
    assert ema.shortfall(needed) is None and ema.shortfall(needed - 1) is not None


def test_a_failed_background_gather_is_raised_to_the_consumer_instead_of_leaving_it_waiting():
    split = CachedSplit(torch.arange(6.0).view(6, 1, 1, 1), torch.arange(6), np.array(["a"] * 6), np.arange(6))
    loader = CachedBatchLoader(split, 3, torch.device("cpu"), prefetch=1)
    chunks = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 99])]  # the second batch names a row the split lacks
    delivered, raised = [], []

    def consume() -> None:
        try:
            for _, labels in loader._prefetched(chunks):
                delivered.append(labels.tolist())
        except IndexError as error:
            raised.append(error)

    before = threading.active_count()
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=2.0)
    assert not consumer.is_alive(), "the consumer is still waiting for a batch the background thread failed to gather"
    assert delivered == [[0, 1, 2]] and len(raised) == 1
    assert threading.active_count() == before  # neither thread outlives the failed epoch
