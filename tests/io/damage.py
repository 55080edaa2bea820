"""Seeded damage for reader tests: a reader of untrusted files must answer every damaged copy with a typed error."""

from __future__ import annotations

import random
from collections.abc import Iterator


def mutations(raw: bytes, count: int, seed: int = 0) -> Iterator[bytes]:
    """Damaged copies of a file: cut short, or with bytes overwritten in the header or anywhere (seeded)."""
    rng = random.Random(seed)
    for _ in range(count):
        data = bytearray(raw)
        if rng.random() < 0.2:
            data = data[: rng.randrange(8, len(data))]
        near_header = rng.random() < 0.5
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(8, min(len(data), 512)) if near_header else rng.randrange(len(data))
            if i < len(data):
                data[i] = rng.randrange(256)
        yield bytes(data)
