"""Reading untrusted DICOM without trusting its value lengths.

pydicom reads an element of length L with `file.read(L)`, and CPython's buffered and raw file readers allocate all L
bytes before they read: a 40 KB file whose Pixel Data claims 4 GB makes a 4 GB allocation, for every file and request
that says so. A byte buffer (BytesIO) returns only what it holds. `ClampedReader` gives a file the same behaviour: a
read asks for no more than what is left in it. A deflated data set is inflated by pydicom whole, before any element
is read, whatever `stop_before_pixels` says: `dicom_source` counts its inflated size first. It is what every reader of
untrusted DICOM hands pydicom.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from medtriage.io.decode_limits import DecodeLimits, check_inflated_size, default_limits
from medtriage.io.header_warnings import reading


class ClampedReader:
    """A binary file whose read(n) never asks for more than the bytes left after the current position."""

    def __init__(self, file: BinaryIO, size: int):
        self._file = file
        self._size = size

    @classmethod
    def over(cls, file: BinaryIO) -> ClampedReader:
        """`file` clamped to its own size."""
        return cls(file, _size(file))

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._file.tell())
        return self._file.read(left if n is None or n < 0 else min(n, left))

    def __getattr__(self, name: str):  # seek, tell, name, close ... as the file has them
        return getattr(self._file, name)


def _size(file: BinaryIO) -> int:
    try:
        return os.fstat(file.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):  # not a real file: measure by seeking
        here = file.tell()
        end = file.seek(0, io.SEEK_END)
        file.seek(here)
        return end


@contextmanager
def dicom_source(
    source: str | Path | bytes | bytearray | memoryview | BinaryIO,
    where: str,
    limits: DecodeLimits | None = None,
    *,
    inflated_allowed: int | None = None,
    inflated_hint: str | None = None,
) -> Iterator[BinaryIO]:
    """`source` as a file for pydicom.dcmread whose reads are bounded by its real size (bytes as a buffer, a path
    opened here and closed on leaving, a file object clamped and left open for its owner), after refusing a deflated
    data set that would inflate past `limits` (the service's defaults when None), or past `inflated_allowed` bytes
    where a caller bounds it itself, with ImageTooLargeError (`inflated_hint` saying how to raise that bound)."""
    with reading(where), _bounded(source) as fp:
        check_inflated_size(fp, limits or default_limits(), where, allowed=inflated_allowed, hint=inflated_hint)
        yield fp


@contextmanager
def _bounded(source: str | Path | bytes | bytearray | memoryview | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source)
    elif isinstance(source, io.BytesIO):
        yield source  # a buffer already returns only what it holds
    elif isinstance(source, (str, Path)):
        with open(source, "rb") as file:
            yield ClampedReader.over(file)  # type: ignore[misc]
    else:
        yield ClampedReader.over(source)  # type: ignore[misc]
