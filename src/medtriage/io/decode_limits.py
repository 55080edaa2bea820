"""What a DICOM header may claim before anything is decoded (pydicom only).

A small compressed file can claim a frame size that expands to gigabytes, and JPEG / JPEG-LS / JPEG 2000
codestreams state their own size, which decoders trust: both are bounded here, from the header and the
first bytes of each frame, before a decoder runs.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medtriage.errors import DicomError, ImageTooLargeError


@dataclass(frozen=True)
class DecodeLimits:
    """What a header may claim before anything is decoded: a small compressed file can claim a frame
    size that expands to gigabytes. `max_decoded_bytes` bounds the float32 pixels a call returns."""

    max_frame_pixels: int = 8192 * 8192  # rows x columns (a large mammogram is ~ 4000 x 5000)
    max_frames: int = 4096
    max_decoded_bytes: int = 1 << 30  # 1 GiB of float32 output (e.g. 512 x 512 x 1024 frames)


_DEFAULT_LIMITS = [DecodeLimits()]
HEADER_BYTES = 16 << 20  # room for the non-pixel elements of an inflated data set
# How far into a frame its size is looked for: APPn / COM segments (an ICC profile, up to 64 KiB each) and JP2
# header boxes may come before the JPEG frame header or the JPEG 2000 SIZ marker.
CODESTREAM_HEAD_BYTES = 1 << 20


def set_default_limits(limits: DecodeLimits) -> None:
    """The limits `read_dicom` applies when a call passes none (a service sets them once from its options)."""
    _DEFAULT_LIMITS[0] = limits


def default_limits() -> DecodeLimits:
    return _DEFAULT_LIMITS[0]


def check_limits(ds: pydicom.Dataset, limits: DecodeLimits, where: str, frame: int | None = None) -> None:
    """Refuse, from the header alone, an image whose decode would exceed `limits`."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError) as err:
        raise DicomError(
            f"malformed image size attributes ({err})",
            where=where,
            hint="Rows, Columns, NumberOfFrames and SamplesPerPixel must be whole numbers",
        ) from err
    if rows <= 0 or columns <= 0 or frames <= 0 or samples <= 0:
        raise DicomError(
            f"image claims {rows} x {columns} pixels, {frames} frame(s), {samples} sample(s) per pixel",
            where=where,
            hint="the image pixel module is incomplete; fix the export in the source system",
        )
    if frame is not None and not 0 <= frame < frames:
        raise DicomError(f"frame {frame + 1} requested of an image with {frames} frame(s)", where=where)
    hint = "raise the decode limits (medtriage serve --max-frame-pixels/--max-frames/--max-decoded-bytes) if it is genuine"
    if rows * columns > limits.max_frame_pixels:
        raise ImageTooLargeError(
            f"frame of {rows} x {columns} pixels exceeds the limit of {limits.max_frame_pixels} pixels per frame", where=where, hint=hint
        )
    if frames > limits.max_frames:
        raise ImageTooLargeError(f"{frames} frames exceed the limit of {limits.max_frames}", where=where, hint=hint)
    # float32 output; a palette colour image holds one sample per pixel but comes out as RGB
    channels = 3 if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR" else min(samples, 3)
    decoded = rows * columns * channels * (1 if frame is not None else frames) * 4
    if decoded > limits.max_decoded_bytes:
        raise ImageTooLargeError(
            f"decoding would produce {decoded} bytes of pixels, over the limit of {limits.max_decoded_bytes}", where=where, hint=hint
        )
    _check_codestreams(ds, rows * columns * samples, frames, where)


def _check_codestreams(ds: pydicom.Dataset, claimed: int, frames: int, where: str) -> None:
    """A JPEG / JPEG-LS / JPEG 2000 frame states its own size, which decoders trust: it must not exceed
    the header's (else a few bytes can ask a decoder for gigabytes)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_encapsulated or "PixelData" not in ds:
        return
    try:
        for data in pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=frames):
            size = _codestream_samples(data[:CODESTREAM_HEAD_BYTES])
            if size is not None and size > claimed:
                raise DicomError(
                    f"cannot decode pixel data: a compressed frame declares {size} samples, the header {claimed}",
                    where=where,
                    hint="the pixel data does not match its header; export the image again",
                )
    except DicomError:
        raise
    except Exception:  # malformed encapsulation: the decoder reports it with its own reason
        return


def _codestream_samples(head: bytes) -> int | None:
    """width x height x components a JPEG 2000 or JPEG / JPEG-LS codestream declares (None if not found)."""
    start = head.find(b"\xff\x4f\xff\x51")  # SOC + SIZ, also inside a JP2 wrapper
    if start >= 0 and len(head) >= start + 42:
        x, y, x0, y0 = struct.unpack(">4I", head[start + 8 : start + 24])
        components = struct.unpack(">H", head[start + 40 : start + 42])[0]
        return max(x - x0, 0) * max(y - y0, 0) * components
    try:
        found = pydicom.pixels.utils._get_jpg_parameters(head)
    except Exception:
        return None
    if "height" in found and "width" in found:
        return int(found["height"]) * int(found["width"]) * int(found.get("components") or 1)
    return None


def check_inflated_size(fp: BinaryIO, limits: DecodeLimits, where: str) -> None:
    """A Deflated Explicit VR Little Endian file is inflated whole by pydicom before any element is read, and deflate
    expands up to ~1000-fold: a 1 MB file can become 1 GB. Inflate it here in bounded chunks, counting only, and refuse
    a data set larger than `limits` allow for its pixels (plus `HEADER_BYTES`). Leaves `fp` where it was; files of
    other transfer syntaxes, or unreadable ones, are left to pydicom."""
    start = fp.tell()
    try:
        pydicom.filereader.read_preamble(fp, True)
        meta = pydicom.filereader._read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        allowed, total, inflater = limits.max_decoded_bytes + HEADER_BYTES, 0, zlib.decompressobj(-zlib.MAX_WBITS)
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or fp.read(1 << 16)
            if not chunk:
                break
            total += len(inflater.decompress(chunk, 1 << 20))  # at most 1 MiB of output at a time
            if total > allowed:
                raise ImageTooLargeError(
                    f"the deflated data set inflates to more than {allowed} bytes",
                    where=where,
                    hint="raise the decode limits (medtriage serve --max-decoded-bytes) if it is genuine",
                )
    except ImageTooLargeError:
        raise
    except Exception:  # a damaged header or stream: pydicom reports it with its own reason
        return
    finally:
        fp.seek(start)
