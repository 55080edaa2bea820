"""Uncompressed grayscale pixels straight from the file's bytes to display values (numpy only).

Most of what the DICOM grayscale pipeline does to an uncompressed image is one affine map and a clip:
rescale slope/intercept, a LINEAR window (or the stored range) and MONOCHROME1 inversion fold into
`clip(stored * scale + offset, 0, 1)`. Done step by step on a large radiograph, each step is a pass over
tens of megabytes; here the stored values are read in place from the file's bytes (no copy) and mapped
block by block, each block staying in the CPU cache through every step, with its sum taken on the way.
The same blocked map serves what pydicom's decoders return for compressed grayscale images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

from medtriage.io.decode_limits import number_of_frames

# Uncompressed little-endian transfer syntaxes: the pixel bytes are the stored values as they lie.
NATIVE_SYNTAXES = frozenset({pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian})
BLOCK_PIXELS = 1 << 16  # 256 KiB of float32 per block: it stays in the core's own cache through every step


@dataclass(frozen=True)
class StoredValues:
    """Integer stored values `[F, H, W]` (possibly a read-only view of the file's bytes), with the bits a value
    really has: the bits above those may hold anything and are ignored."""

    values: np.ndarray
    bits_stored: int
    resolution_level: int = 0  # a JPEG 2000 frame decoded at 1/2^level of its size

    @property
    def unused_bits(self) -> int:
        return 8 * self.values.dtype.itemsize - self.bits_stored

    def corrected(self) -> np.ndarray:
        """A writable copy with the unused high bits cleared (unsigned) or sign-extended (signed), as pydicom does."""
        return _valid_bits(self.values, self.unused_bits)


def native_stored(ds: pydicom.Dataset, syntax, frame: int | None) -> StoredValues | None:
    """The stored values of an uncompressed little-endian grayscale image with 8 or 16 allocated bits, as a view
    of the file's bytes; None for anything else, or for pixel data shorter than the header says (pydicom's
    decoder then says what is wrong)."""
    if syntax not in NATIVE_SYNTAXES or "PixelData" not in ds or int(ds.get("SamplesPerPixel") or 1) != 1:
        return None
    allocated = int(ds.get("BitsAllocated") or 0)
    bits_stored = int(ds.get("BitsStored") or allocated)
    if allocated not in (8, 16) or not 0 < bits_stored <= allocated:
        return None
    rows, columns, frames = int(ds.Rows), int(ds.Columns), number_of_frames(ds)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < rows * columns * frames * allocated // 8:
        return None
    kind = "i" if int(ds.get("PixelRepresentation") or 0) == 1 else "u"
    values = np.frombuffer(data, np.dtype(f"<{kind}{allocated // 8}"), count=rows * columns * frames).reshape(frames, rows, columns)
    return StoredValues(values if frame is None else values[frame : frame + 1], bits_stored)


def affine_to_unit(stored: StoredValues, scale: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """`clip(stored * scale + offset, 0, 1)` as float32 `[F, 1, H, W]`, and the mean of each frame `[F]`."""
    frames = stored.values.reshape(len(stored.values), -1)
    out = np.empty(frames.shape, np.float32)
    sums = np.zeros(len(frames), np.float64)
    scale32, offset32 = np.float32(scale), np.float32(offset)
    spare = np.empty(min(BLOCK_PIXELS, frames.shape[1]), frames.dtype) if stored.unused_bits else None
    for f, (source, target) in enumerate(zip(frames, out)):
        for start in range(0, len(source), BLOCK_PIXELS):
            block = target[start : start + BLOCK_PIXELS]
            values = source[start : start + BLOCK_PIXELS]
            if spare is not None:
                values = _valid_bits(values, stored.unused_bits, out=spare[: len(values)])
            np.copyto(block, values, casting="unsafe")  # integer -> float32 (a mixed-type multiply would be slower)
            block *= scale32
            block += offset32
            np.clip(block, 0.0, 1.0, out=block)
            sums[f] += float(block.sum())  # float32 pairwise within a block, float64 across blocks
    return out.reshape(len(frames), 1, *stored.values.shape[1:]), sums / max(frames.shape[1], 1)


def _valid_bits(values: np.ndarray, unused: int, out: np.ndarray | None = None) -> np.ndarray:
    if values.dtype.kind == "u":
        return np.bitwise_and(values, (1 << (8 * values.dtype.itemsize - unused)) - 1, out=out)
    shifted = np.left_shift(values, unused, out=out)
    return np.right_shift(shifted, unused, out=shifted)  # arithmetic shift: the sign bit spreads back
