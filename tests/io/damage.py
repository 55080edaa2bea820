"""Seeded damage for reader tests: a reader of untrusted files must answer every damaged copy with a typed error."""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Callable, Iterable, Iterator


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


def untyped_failures(copies: Iterable[bytes], read: Callable[[bytes], object], typed: type[Exception]) -> list[str]:
    """What `read` raised on the damaged `copies` that is not a `typed` error (each would reach the user as a
    traceback, stop a batch or answer HTTP 500); an empty list when every copy read or failed typed."""
    escaped = []
    for data in copies:
        try:
            read(data)
        except typed:
            pass
        except Exception as err:
            escaped.append(f"{type(err).__name__}: {err}")
    return escaped


def with_vr(raw: bytes, tag: int, vr: bytes) -> bytes:
    """An explicit VR file with element `tag` labelled `vr` instead (the same length: nothing else moves), as a writer
    that mislabels one element leaves it."""
    header = re.compile(re.escape(struct.pack("<HH", tag >> 16, tag & 0xFFFF)) + b"[A-Z]{2}")
    found = [m.start() for m in header.finditer(raw)]
    if len(found) != 1:
        raise ValueError(f"element {tag:08X} found {len(found)} times, not once")
    return raw[: found[0] + 4] + vr + raw[found[0] + 6 :]


def replaced(raw: bytes, old: bytes, new: bytes) -> bytes:
    """`raw` with its one occurrence of `old` overwritten by `new`, of the same length."""
    if len(old) != len(new) or raw.count(old) != 1:
        raise ValueError("needs one occurrence and a replacement of the same length")
    return raw.replace(old, new)
