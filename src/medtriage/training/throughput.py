"""How fast an epoch went, and whether the compute device or the data path set the pace.

`EpochClock` splits an epoch's wall time into time spent inside training steps and the rest
(waiting for the next batch, logging). What it reports is named after what it measured:

- on CUDA, `train/gpu_busy_fraction`: time the GPU spent inside the steps, timed with CUDA events
  on the stream (so queued, asynchronous work counts when it runs), divided by the epoch's wall time;
- on CPU, `train/cpu_compute_fraction`: wall time inside the steps (forward, backward, optimiser,
  device augmentation) divided by the epoch's wall time; the remainder is data waiting.

Both come with `train/images_per_s` and `train/data_wait_s`: host time from the epoch's start, or the end of a step, to
the start of the next step (waiting for the batch). It is measured, not inferred from the rest: on CUDA the epoch's
end waits for the GPU's queued work, which is not data waiting. Only the CUDA path synchronises, once
per epoch, so the clock does not slow the loop it measures.
"""

from __future__ import annotations

import time

import torch


class EpochClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.started = time.perf_counter()
        self.step_seconds = 0.0
        self.images = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._step_started = 0.0
        self.wait_seconds = 0.0
        self._waiting_since = self.started

    def step_begins(self) -> None:
        self._step_started = time.perf_counter()
        self.wait_seconds += self._step_started - self._waiting_since
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, torch.cuda.Event(enable_timing=True)))

    def step_ends(self, images: int) -> None:
        if self.cuda:
            self._events[-1][1].record()
        self._waiting_since = time.perf_counter()
        self.step_seconds += self._waiting_since - self._step_started
        self.images += images

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict[str, float]:
        """Per-epoch figures for MLflow (call once, after the last step)."""
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = max(self.elapsed(), 1e-9)
        figures = {
            "train/images_per_s": self.images / elapsed,
            "train/epoch_s": elapsed,
            "train/data_wait_s": self.wait_seconds,
        }
        if self.cuda:
            busy = sum(start.elapsed_time(end) for start, end in self._events) / 1000
            figures["train/gpu_busy_fraction"] = min(1.0, busy / elapsed)
        else:
            figures["train/cpu_compute_fraction"] = min(1.0, self.step_seconds / elapsed)
        return figures
