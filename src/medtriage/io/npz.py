"""MedMNIST-layout npz files, read as untrusted input (numpy only).

An npz is a zip of `.npy` members, and each member's header states a dtype and a shape that `np.load` allocates before
it reads a byte. So each member's header is read first and the array is refused unless its dtype is plain numbers
(never pickled objects), its shape is what the layout holds (`<split>_images`: uint8 `[N, H, W]` or `[N, H, W, 3]`;
`<split>_labels`: integers `[N]` or `[N, 1]`), and its size is within both `max_bytes` and the size the zip states for
the member. Only then is it allocated and filled.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from medtriage.errors import DataNotFoundError, InputError

SPLITS = ("train", "val", "test")
MAX_ARRAY_BYTES = 8 << 30  # one array; the largest MedMNIST+ 2D release (ChestMNIST, 224 px) holds 3.9 GB of images
NPZ_HINT = "give a MedMNIST .npz (train/val/test _images and _labels), e.g. data/samples/pneumoniamnist_28.npz"


def read_npz(
    npz_path: str | Path, splits: Sequence[str] = SPLITS, *, max_bytes: int = MAX_ARRAY_BYTES
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split name -> (images uint8 `[N, H, W]` or `[N, H, W, 3]`, labels int64 `[N]`)."""
    npz_path = Path(npz_path)
    with _archive(npz_path) as archive:
        return {split: _split(archive, npz_path, split, max_bytes) for split in splits}


def array_shape(npz_path: str | Path, key: str) -> tuple[int, ...]:
    """The shape one member's header states, checked as `read_npz` checks it but with none of its data read: a
    caller can bound the array (e.g. its image count) before `read_npz` allocates it."""
    npz_path = Path(npz_path)
    with _archive(npz_path) as archive, _member(archive, npz_path, key) as (member, _):
        return _header(member, f"{npz_path}#{key}")[0]


@contextmanager
def _archive(npz_path: Path) -> Iterator[zipfile.ZipFile]:
    if npz_path.is_dir():  # "not found" would send the user looking for a missing file
        inside = sorted(npz_path.glob("*.npz"))[:1]
        hint = f"give the .npz file itself, e.g. {inside[0]}" if inside else NPZ_HINT
        raise InputError("this is a folder, not an npz file", where=npz_path, hint=hint)
    if not npz_path.is_file():
        raise DataNotFoundError("npz file not found", where=npz_path, hint=NPZ_HINT)
    try:
        with zipfile.ZipFile(npz_path) as archive:
            yield archive
    # not a zip, an archive feature zipfile lacks, or a member that is corrupt or cut short
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as err:
        raise InputError(f"not a readable npz file ({err})", where=npz_path, hint=NPZ_HINT) from err


def _split(archive: zipfile.ZipFile, npz_path: Path, split: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    images = _array(archive, npz_path, f"{split}_images", max_bytes)
    labels = _array(archive, npz_path, f"{split}_labels", max_bytes)
    if not len(images):
        raise InputError(f"'{split}_images' holds no images", where=npz_path, hint=NPZ_HINT)
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise InputError(
            f"'{split}_images' is {images.dtype} {list(images.shape)}, not uint8 [N, H, W] or [N, H, W, 3]",
            where=npz_path,
            hint=NPZ_HINT,
        )
    if labels.dtype.kind not in "iu" or labels.shape not in ((len(images),), (len(images), 1)):
        raise InputError(
            f"'{split}_labels' is {labels.dtype} {list(labels.shape)}, not one integer label for each of the "
            f"{len(images)} images (multi-label sets are not supported)",
            where=npz_path,
            hint=NPZ_HINT,
        )
    return images, _as_int64(labels.reshape(-1), f"{npz_path}#{split}_labels")


def require_pixels(images: np.ndarray, split: str, where: str | Path) -> None:
    """Refuse a split whose images have a side of 0: pooled, they would make the pool read as damaged; scored, the
    graph's resize fails on them with a bare ONNX Runtime error."""
    height, width = images.shape[1:3]
    if not height or not width:
        raise InputError(f"'{split}_images' holds images of {height} x {width} pixels: no pixels", where=where, hint=NPZ_HINT)


def _as_int64(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64, refused where a uint64 label does not fit: converted, 2**63 would read as a negative number,
    and a refusal quoting it would name a label the file does not hold."""
    if labels.dtype == np.uint64:
        past = np.flatnonzero(labels > np.iinfo(np.int64).max)
        if len(past):
            raise InputError(
                f"{len(past)} label(s) are larger than any class index can be, the first at index {int(past[0])}: {int(labels[past[0]])}",
                where=where,
                hint=NPZ_HINT,
            )
    return labels.astype(np.int64)


def _array(archive: zipfile.ZipFile, npz_path: Path, key: str, max_bytes: int) -> np.ndarray:
    """One member, its header checked before anything is allocated."""
    where = f"{npz_path}#{key}"
    with _member(archive, npz_path, key) as (member, file_size):
        shape, fortran_order, dtype = _header(member, where)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > min(max_bytes, file_size):
            raise InputError(
                f"header claims {list(shape)} {dtype} ({nbytes} bytes); the zip holds {file_size} bytes for it and "
                f"the limit is {max_bytes}",
                where=where,
                hint="the file is corrupt or not a MedMNIST npz; raise max_bytes only for a genuine larger set",
            )
        array = np.empty(shape[::-1] if fortran_order else shape, dtype=dtype)
        if array.size:  # an empty array has nothing to read (and a memoryview of it cannot be cast)
            _fill(member, memoryview(array).cast("B"), where)
        if member.read(1):  # reading to the end also makes zipfile check the member's CRC: flipped bits are refused
            raise InputError("array data runs past what its header states", where=where, hint=NPZ_HINT)
    return array.T if fortran_order else array


@contextmanager
def _member(archive: zipfile.ZipFile, npz_path: Path, key: str) -> Iterator[tuple[IO[bytes], int]]:
    """The open `<key>.npy` member and the size the zip states for it."""
    try:
        info = archive.getinfo(f"{key}.npy")
    except KeyError:
        raise InputError(f"not a MedMNIST npz: no '{key}' array", where=npz_path, hint=NPZ_HINT) from None
    with archive.open(info) as member:
        yield member, info.file_size


def _header(member: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the member's npy header, refused unless the dtype is plain numbers."""
    try:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"npy format version {version} is not supported")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
    except Exception as err:  # numpy parses the header as a Python literal: any malformed text may surface here
        raise InputError(f"not an npy array ({type(err).__name__}: {err})", where=where, hint=NPZ_HINT) from err
    if dtype.hasobject:
        raise InputError("holds Python objects, which would be unpickled: refused", where=where, hint=NPZ_HINT)
    if dtype.kind not in "biuf":
        raise InputError(f"holds {dtype} values, not numbers", where=where, hint=NPZ_HINT)
    return shape, fortran_order, dtype


def _fill(member, buffer: memoryview, where: str) -> None:
    filled = 0
    while filled < len(buffer):
        got = member.readinto(buffer[filled:])
        if not got:
            raise InputError(f"array data ends after {filled} of {len(buffer)} bytes", where=where, hint=NPZ_HINT)
        filled += got
