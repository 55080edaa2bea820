"""Batches straight from a cached split: one gather per batch instead of one Python call per image.

Used when augmentation runs on the training device (`trainer.augment_on=device`), so the loader
has nothing to do per image. On CUDA the split either lives on the GPU (`trainer.cache_on_device`,
the whole split copied once; batches are gathered there) or stays in host memory and each batch
is gathered into pinned memory by a background thread and copied on a side stream one batch
ahead, so the copy overlaps the previous step. On CPU it is a plain gather.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import torch

from medtriage.data.torch.datasets import CachedSplit

_DONE = object()


class _Failed:
    """What the background gather raised, handed to the consumer to raise in its own thread."""

    def __init__(self, error: Exception):
        self.error = error


class CachedBatchLoader:
    """Iterate `(images, labels)` batches of `split` in the order of `indices`, already on `device`."""

    def __init__(
        self, split: CachedSplit, batch_size: int, device: torch.device, drop_last: bool = False, on_device: bool = False, prefetch: int = 3
    ):
        self.batch_size, self.device, self.drop_last, self.prefetch = batch_size, device, drop_last, prefetch
        cuda = device.type == "cuda"
        self.on_device = cuda and on_device
        self.pinned = cuda and not on_device
        home = device if self.on_device else torch.device("cpu")
        self.images, self.labels = split.images.to(home), split.labels.to(home)

    def batches(self, indices: Sequence[int] | torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(indices, dtype=torch.int64)
        if self.on_device:
            order = order.to(self.device)  # one small copy per epoch, not one per batch
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()
        if self.pinned:
            return _copied_ahead(self._prefetched(chunks), self.device)
        return (self._gather(chunk) for chunk in chunks)

    def _gather(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.index_select(0, chunk), self.labels.index_select(0, chunk)

    def _gather_into(self, chunk: torch.Tensor, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`_gather`, written straight into pinned memory when `pin`."""
        images = torch.empty((len(chunk), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=pin)
        torch.index_select(self.images, 0, chunk, out=images)
        labels = self.labels.index_select(0, chunk)
        return images, labels.pin_memory() if pin else labels

    def _prefetched(self, chunks: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Gathered by a background thread, `prefetch` batches ahead (into pinned memory when bound for CUDA)."""
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop, pin = threading.Event(), self.device.type == "cuda"

        def produce() -> None:
            try:
                for chunk in chunks:
                    if stop.is_set():
                        return
                    ready.put(self._gather_into(chunk, pin))
            except Exception as error:  # raised again by the consumer, which would otherwise wait for it forever
                ready.put(_Failed(error))
                return
            ready.put(_DONE)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:  # the consumer may stop early (limit_train_batches): let the producer finish, free its batches
            stop.set()
            while producer.is_alive():
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass


def _copied_ahead(batches: Iterator, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Copy batch k+1 to the GPU on a side stream while the caller computes on batch k."""
    stream = torch.cuda.Stream(device)

    def start_copy(batch):
        with torch.cuda.stream(stream):
            return tuple(t.to(device, non_blocking=True) for t in batch)

    upcoming = next(batches, None)
    pending = start_copy(upcoming) if upcoming is not None else None
    while pending is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        for tensor in pending:
            tensor.record_stream(torch.cuda.current_stream(device))
        current = pending
        upcoming = next(batches, None)
        pending = start_copy(upcoming) if upcoming is not None else None
        yield current
