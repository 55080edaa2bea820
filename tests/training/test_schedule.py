"""Learning-rate schedules (trainer.schedule): warm-up + cosine, and one-cycle."""

from __future__ import annotations

import pytest
import torch

from medtriage.config.schema import Schedule, TrainerConfig
from medtriage.training.optimiser import build_scheduler


def rates(trainer: TrainerConfig, steps_per_epoch: int) -> list[float]:
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=trainer.lr)
    scheduler = build_scheduler(optimizer, trainer, steps_per_epoch)
    seen = []
    for _ in range(trainer.max_epochs * steps_per_epoch):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


def test_one_cycle_rises_to_the_peak_then_anneals_to_almost_nothing():
    trainer = TrainerConfig(max_epochs=4, lr=0.01, schedule=Schedule.one_cycle, one_cycle_pct_start=0.25)
    lr = rates(trainer, steps_per_epoch=25)
    peak = max(range(len(lr)), key=lr.__getitem__)
    assert lr[0] == pytest.approx(0.01 / 25)  # torch's default start: peak / 25
    assert lr[peak] == pytest.approx(0.01, rel=1e-3) and abs(peak - 25) <= 1
    assert all(a <= b for a, b in zip(lr[:peak], lr[1 : peak + 1]))
    assert all(a >= b for a, b in zip(lr[peak:], lr[peak + 1 :]))
    assert lr[-1] < 1e-4


def test_cosine_warms_up_then_decays_to_its_floor():
    trainer = TrainerConfig(max_epochs=4, lr=0.01, warmup_epochs=1, min_lr_ratio=0.1)
    lr = rates(trainer, steps_per_epoch=10)
    assert lr[0] == pytest.approx(0.001) and lr[9] == pytest.approx(0.01)
    assert lr[-1] == pytest.approx(0.001) and min(lr[10:]) >= 0.001 - 1e-12


def test_one_cycle_state_resumes_where_it_stopped():
    trainer = TrainerConfig(max_epochs=2, lr=0.01, schedule=Schedule.one_cycle)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=trainer.lr)
    scheduler = build_scheduler(optimizer, trainer, 10)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    resumed_optimizer = torch.optim.AdamW(model.parameters(), lr=trainer.lr)
    resumed = build_scheduler(resumed_optimizer, trainer, 10)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.get_last_lr() == scheduler.get_last_lr()
