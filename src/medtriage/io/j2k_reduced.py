"""JPEG 2000 frames decoded at a lower resolution level, for callers that need far fewer pixels than the image has.

A JPEG 2000 codestream is a wavelet pyramid: resolution level r holds the image at 1/2^r of its size, and
openjpeg decodes it without touching the code-blocks of the finer levels, where nearly all of the decoding
time goes. A model that resizes every image to 28 or 224 pixels inside its graph needs nothing like a
2000-pixel radiograph: the caller names the smallest side it needs (`min_side`), and the frame is decoded
at the coarsest level whose both sides still reach it. The level-r image is the wavelet's low-pass band,
on the scale of the stored values: a smoothed, subsampled image (not bit-identical to resizing the full
decode), so this is for scoring, never for display or training data.

Only plain single-component unsigned codestreams are taken (origin at 0, no subsampling); anything else,
or any failure, returns None, as does a level whose bits above Bits Stored are not the same throughout (see
`_mixed_unused_bits`), and the caller decodes the full image as usual. Decoding goes through
Pillow's openjpeg binding, whose public `reduce` rounds the reduced size where openjpeg takes the ceiling:
the size is set here as openjpeg computes it. The one exception to "return None" is a main header that cannot be
walked to its coding style segment within decode_limits.MAX_HEADER_SEGMENTS marker segments: a damaged or hostile
codestream, refused (read_dicom names the file), not handed on.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom

from medtriage.io.decode_limits import MAX_HEADER_SEGMENTS, number_of_frames
from medtriage.io.encapsulation import MalformedItems, frame_bytes, located_frames

J2K_SYNTAXES = frozenset({pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000})
_SOC, _SIZ, _COD, _SOT = b"\xff\x4f", b"\xff\x51", b"\xff\x52", b"\xff\x90"


class MalformedCodestreamError(ValueError):
    """A JPEG 2000 main header whose marker segments cannot be walked to its coding style segment (the message
    completes "frame N ..."); read_dicom refuses the file with it."""


def reduced_j2k_frames(ds: pydicom.Dataset, syntax, frame: int | None, min_side: int | None) -> tuple[np.ndarray, int] | None:
    """(stored values `[F, h, w]` at the coarsest level with both sides >= `min_side`, that level), or None where
    no level below full size qualifies or the frame is not a plain grayscale codestream."""
    if not min_side or syntax not in J2K_SYNTAXES or int(ds.get("SamplesPerPixel") or 1) != 1:
        return None
    if int(ds.get("PixelRepresentation") or 0) != 0:
        return None
    rows, columns, count = int(ds.Rows), int(ds.Columns), number_of_frames(ds)
    bits_stored = int(ds.get("BitsStored") or 0)
    try:
        frames = list(located_frames(ds, count))  # where each frame lies, as pydicom's decoders find it: nothing copied
    except MalformedItems:  # the full decode reports it
        return None
    if len(frames) < count:  # fewer frames than the header says: the full decode reports it
        return None
    decoded, level = [], 0
    for index in range(count) if frame is None else [frame]:
        codestream = frame_bytes(ds.PixelData, frames[index])
        try:
            header = _codestream_header(codestream)
        except MalformedCodestreamError as err:
            raise MalformedCodestreamError(f"frame {index + 1} {err}") from None
        if header is None or header[:2] != (rows, columns):
            return None
        level = _level(rows, columns, header[3], min_side)
        values = _decode_at(codestream, level, header[2]) if level else None
        if values is None or values.shape != (-(-rows // 2**level), -(-columns // 2**level)):
            return None
        if _mixed_unused_bits(values, bits_stored):
            return None
        decoded.append(values)
    return np.stack(decoded), level


def _mixed_unused_bits(values: np.ndarray, bits_stored: int) -> bool:
    """True where the bits above Bits Stored differ across the level. The low-pass band averages whole samples, so a
    high bit set in some of them (an overlay) is spread into the stored bits beside it, and dropping the high bits
    afterwards leaves noise there; the same high bits everywhere shift every value alike and drop out exactly."""
    if not 0 < bits_stored < 8 * values.dtype.itemsize:
        return False
    high = values >> bits_stored
    return bool(high.min() != high.max())


def _level(rows: int, columns: int, levels: int, min_side: int) -> int:
    level = 0
    while level < levels and min(-(-rows // 2 ** (level + 1)), -(-columns // 2 ** (level + 1))) >= min_side:
        level += 1
    return level


def _codestream_header(codestream: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, bit precision, wavelet levels) of a single-component unsigned raw codestream; else None."""
    if codestream[:2] != _SOC or codestream[2:4] != _SIZ or len(codestream) < 49:
        return None
    length, _, width, height, x0, y0 = struct.unpack(">HHIIII", codestream[4:24])
    components, depth, dx, dy = struct.unpack(">HBBB", codestream[40:45])
    if x0 or y0 or components != 1 or depth & 0x80 or (dx, dy) != (1, 1):
        return None
    levels = _wavelet_levels(codestream, 4 + length)
    return None if levels is None else (height, width, (depth & 0x7F) + 1, levels)


def _wavelet_levels(codestream: bytes, position: int) -> int | None:
    """The decomposition levels of the coding style segment (COD), reached by stepping over the main header's marker
    segments from `position` by their lengths; None where the main header ends (first tile, SOT) without one.
    A header may hold any number of comment segments: the walk stops at MAX_HEADER_SEGMENTS, so that it stays cheap."""
    for _ in range(MAX_HEADER_SEGMENTS):
        if len(codestream) < position + 4 or codestream[position] != 0xFF:
            raise MalformedCodestreamError(f"has no JPEG 2000 marker segment at byte {position}, before its coding style segment (COD)")
        marker, length = codestream[position : position + 2], struct.unpack_from(">H", codestream, position + 2)[0]
        if marker == _SOT:
            return None
        if length < 2:  # a segment's length counts its own two bytes (ISO 15444-1 A.1.3)
            raise MalformedCodestreamError(f"has a JPEG 2000 marker segment of length {length} at byte {position}")
        if marker == _COD:
            if len(codestream) < position + 10:
                raise MalformedCodestreamError("ends inside its JPEG 2000 coding style segment (COD)")
            return codestream[position + 9]
        position += 2 + length
    raise MalformedCodestreamError(f"has no JPEG 2000 coding style segment (COD) within its first {MAX_HEADER_SEGMENTS} marker segments")


def _decode_at(codestream: bytes, level: int, precision: int) -> np.ndarray | None:
    """The codestream decoded at resolution level `level` (0 = full size) as stored values; None if Pillow fails."""
    try:
        from PIL import Image, ImageFile

        image = Image.open(io.BytesIO(codestream), formats=["JPEG2000"])
        width, height = image.size
        tile = image.tile[0]
        image._size = (-(-width // 2**level), -(-height // 2**level))  # openjpeg's ceiling, not Pillow's rounding
        image.tile = [tile._replace(extents=(0, 0, *image._size), args=(tile.args[0], level, *tile.args[2:]))]
        ImageFile.ImageFile.load(image)
        values = np.asarray(image)
    except Exception:  # a Pillow without this layout, or a codestream it refuses: the full decode takes over
        return None
    container = 8 * values.dtype.itemsize
    if values.dtype.kind != "u" or precision > container:
        return None
    return values >> (container - precision) if precision < container else values  # Pillow scales values up to its mode
