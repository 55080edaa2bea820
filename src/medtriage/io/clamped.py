"""Reading untrusted DICOM without trusting its value lengths.

pydicom reads an element of length L with `file.read(L)`, and CPython's buffered and raw file readers allocate all L
bytes before they read: a 40 KB file whose Pixel Data claims 4 GB makes a 4 GB allocation, for every file and request
that says so. A byte buffer (BytesIO) returns only what it holds. `ClampedReader` gives a file the same behaviour: a
read asks for no more than what is left in it. A deflated data set is inflated by pydicom whole, before any element
is read, whatever `stop_before_pixels` says, and held twice (inflated, and as its elements): `dicom_source` counts its
inflated size first, and `read_part10` reads it as it inflates instead (a header alone only as far as it reaches).
`dicom_source` (or `bounded_source`, for `read_part10` alone) is what every reader of untrusted DICOM hands pydicom.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import FileDataset
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_partial, read_preamble
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medtriage.io.decode_limits import DecodeLimits, InflatingReader, check_inflated_size, default_limits, inflated_limit
from medtriage.io.header_warnings import reading

SPECIFIC_CHARACTER_SET = 0x00080005


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
    with bounded_source(source, where) as fp:
        check_inflated_size(fp, limits or default_limits(), where, allowed=inflated_allowed, hint=inflated_hint)
        yield fp


@contextmanager
def bounded_source(source: str | Path | bytes | bytearray | memoryview | BinaryIO, where: str) -> Iterator[BinaryIO]:
    """`source` as `dicom_source` gives it, a deflated data set not counted: for `read_part10`, which bounds one as it
    reads it (inflated once, not twice)."""
    with reading(where), _bounded(source) as fp:
        yield fp


def read_part10(
    fp: BinaryIO,
    where: str,
    limits: DecodeLimits | None = None,
    *,
    stop_when: Callable | None = None,
    force: bool = False,
    data_set: Callable[[BinaryIO], BinaryIO] | None = None,
    inflated_allowed: int | None = None,
    inflated_hint: str | None = None,
    stop_before_pixels: bool = False,
    specific_tags: Sequence | None = None,
) -> FileDataset:
    """pydicom's read_partial(fp, stop_when, force=force), the data set read through `data_set(file)` where given (a
    read budget), except that a deflated data set is read as it inflates: pydicom inflates it whole into one buffer,
    which the data set read from it then holds again (a deflated file costs twice its inflated size). One inflating
    past what `limits` allow (the service's defaults when None), or past `inflated_allowed` bytes where a caller bounds
    it itself, is refused with ImageTooLargeError (`inflated_hint` saying how to raise that bound), and one cut short
    with DicomError. The file meta is the file's own: the data set keeps its Deflated transfer syntax.

    A header alone, as pydicom.dcmread reads one with `stop_before_pixels` and `specific_tags` (tags as it takes them):
    pydicom inflates a deflated data set whole for it all the same, where here it inflates no further than the pixel
    data, or the first element past the last tag wanted (the elements are in tag order); a file of another syntax is
    read as dcmread reads it."""
    wrap = data_set or (lambda file: file)
    tags = [Tag(tag) for tag in specific_tags] if specific_tags else None  # as dcmread takes them
    stop = _any_of(stop_when, _at_pixel_data if stop_before_pixels else None)
    start = fp.tell()
    preamble = read_preamble(fp, force)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        fp.seek(start)
        return read_partial(wrap(fp), stop, force=force, specific_tags=tags)
    if tags:  # pydicom reads the Specific Character Set as if wanted: the values wanted are decoded by it
        last = max(*tags, SPECIFIC_CHARACTER_SET)
        stop = _any_of(stop, lambda tag, _vr, _length: tag > last)
    allowed = inflated_limit(limits or default_limits()) if inflated_allowed is None else inflated_allowed
    inflating = InflatingReader(fp, allowed, where, inflated_hint)
    try:
        dataset = read_dataset(wrap(inflating), False, True, stop_when=stop, specific_tags=tags)
    except Exception:
        if inflating.refused:  # raised inside pydicom, which may have wrapped it
            raise inflating.refused from None
        raise
    read = FileDataset(fp, dataset, preamble, meta, False, True)
    read.set_original_encoding(False, True, dataset._character_set)
    return read


def _any_of(*stops: Callable | None) -> Callable | None:
    """A pydicom stop_when that stops where any of `stops` (None: none given) would."""
    given = [stop for stop in stops if stop is not None]
    if len(given) < 2:
        return given[0] if given else None
    return lambda tag, vr, length: any(stop(tag, vr, length) for stop in given)


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
