"""What a DICOM header may claim before anything is decoded (pydicom only).

A small compressed file can claim a frame size that expands to gigabytes, and JPEG / JPEG-LS / JPEG 2000
codestreams state their own size, which decoders trust: both are bounded here, from the header and the
header segments of each frame, before a decoder runs.
"""

from __future__ import annotations

import io
import itertools
import re
import struct
import zlib
from collections.abc import Iterator
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
# Marker segments (JPEG) or boxes (JP2) stepped over to reach a frame's declared size: real files have a few dozen
# (an ICC profile takes up to 255 APP2 segments). The bound keeps the walk cheap whatever a file holds.
MAX_HEADER_SEGMENTS = 1024


def set_default_limits(limits: DecodeLimits) -> None:
    """The limits `read_dicom` applies when a call passes none (a service sets them once from its options)."""
    _DEFAULT_LIMITS[0] = limits


def default_limits() -> DecodeLimits:
    return _DEFAULT_LIMITS[0]


def check_limits(ds: pydicom.Dataset, limits: DecodeLimits, where: str, frame: int | None = None) -> None:
    """Refuse, from the header alone, an image whose decode would exceed `limits`."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = number_of_frames(ds)
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
    if samples not in (1, 3):  # the codestream bound below scales with it: a false count would lift that bound
        raise DicomError(
            f"image claims {samples} samples per pixel; an image holds 1 (grayscale, palette) or 3 (colour)",
            where=where,
            hint="the Samples per Pixel attribute is damaged; export the image again from the source system",
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
    channels = 3 if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR" else samples
    decoded = rows * columns * channels * (1 if frame is not None else frames) * 4
    if decoded > limits.max_decoded_bytes:
        raise ImageTooLargeError(
            f"decoding would produce {decoded} bytes of pixels, over the limit of {limits.max_decoded_bytes}", where=where, hint=hint
        )
    _check_codestreams(ds, rows * columns * samples, frames, where)


def number_of_frames(ds: pydicom.Dataset) -> int:
    """Number of Frames as the header states it, 1 where it is absent or empty; a count of 0 stays 0 (for the caller to
    refuse: read as 1, the image would be decoded as one frame by one decoder and as all it holds by another). Raises
    ValueError for a value that is not a whole number (2.5 would be read as 2)."""
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"Number of Frames {value} is not a whole number")
    return int(value)


def _check_codestreams(ds: pydicom.Dataset, claimed: int, frames: int, where: str) -> None:
    """A JPEG / JPEG-LS / JPEG 2000 frame states its own size, which decoders trust: it must not exceed
    the header's (else a few bytes can ask a decoder for gigabytes). A frame whose size cannot be found
    the way a decoder would find it is refused, never decoded unchecked."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    declared_samples = _DECLARED_SAMPLES.get(syntax)
    if declared_samples is None or "PixelData" not in ds:
        return
    for number, data in enumerate(_frames(ds, frames), start=1):
        try:
            size = declared_samples(data)
        except _NoFrameSize as err:
            raise DicomError(
                f"cannot decode pixel data: frame {number} {err}",
                where=where,
                hint="the pixel data is damaged or not what its transfer syntax says; export the image again",
            ) from err
        if size > claimed:
            raise DicomError(
                f"cannot decode pixel data: a compressed frame declares {size} samples, the header {claimed}",
                where=where,
                hint="the pixel data does not match its header; export the image again",
            )


def _frames(ds: pydicom.Dataset, frames: int) -> Iterator[bytes]:
    """The frames' codestreams as every decoder finds them, as far as the encapsulation can be read (the decoder reports
    a malformed one with its own reason): in fragment order (the imagecodecs fallback, and pydicom without an Extended
    Offset Table), and by the Extended Offset Table where the data set has one, as pydicom's decoders go by it: the two
    can point at different bytes."""
    yield from _readable(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=frames))
    if 0x7FE00001 in ds and 0x7FE00002 in ds:
        table = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        # a decoder reads no more than the header's frames; table entries may overlap, so reading on would cost more
        yield from _readable(itertools.islice(pydicom.encaps.generate_frames(ds.PixelData, extended_offsets=table), frames))


def _readable(codestreams: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from codestreams
    except Exception:
        return


class _NoFrameSize(ValueError):
    """A codestream whose declared size cannot be read (the message completes "frame N ...")."""


def jpeg_samples(codestream: bytes) -> int:
    """Height x width x components of a JPEG / JPEG-LS codestream's frame header, reached by stepping over the
    marker segments before it by their lengths (APPn / COM segments may hold megabytes): nothing is decoded."""
    if codestream[:2] != b"\xff\xd8":
        raise _NoFrameSize("is not a JPEG codestream (it does not start with the SOI marker)")
    position = 2
    for _ in range(MAX_HEADER_SEGMENTS):
        fill = _JPEG_FILL.match(codestream, position)  # a marker, after any 0xFF fill bytes
        if fill is None or fill.end() >= len(codestream):
            raise _NoFrameSize(f"has no JPEG marker at byte {position} before its frame header (SOF)")
        code, position = codestream[fill.end()], fill.end() + 1
        if code in _JPEG_FRAME_HEADERS:
            if len(codestream) < position + 8:
                raise _NoFrameSize("ends inside its JPEG frame header (SOF)")
            height, width, components = struct.unpack_from(">HHB", codestream, position + 3)
            if not (height and width and components):  # a height of 0 is set later (DNL, or a JPEG-LS LSE segment)
                raise _NoFrameSize(f"has a frame header (SOF) that declares {height} x {width} pixels, {components} component(s)")
            return height * width * components
        if code in _JPEG_STANDALONE:
            continue
        if code in _JPEG_BEFORE_FRAME_FORBIDDEN or len(codestream) < position + 2:
            raise _NoFrameSize(f"has no JPEG frame header (SOF) before byte {position}")
        length = struct.unpack_from(">H", codestream, position)[0]
        if length < 2:
            raise _NoFrameSize(f"has a JPEG marker segment of length {length} at byte {position}")
        position += length
    raise _NoFrameSize(f"has no frame header (SOF) within its first {MAX_HEADER_SEGMENTS} marker segments")


def j2k_samples(codestream: bytes) -> int:
    """Width x height x components a JPEG 2000 codestream's SIZ declares. SIZ must follow SOC at the start of the
    codestream (ISO 15444-1 A.4.1); in a JP2 file the codestream is the contents of its jp2c box."""
    start = _jp2_codestream_start(codestream) if codestream.startswith(_JP2_SIGNATURE) else 0
    if codestream[start : start + 4] != b"\xff\x4f\xff\x51":
        raise _NoFrameSize("is not a JPEG 2000 codestream (it does not start with the SOC and SIZ markers)")
    if len(codestream) < start + 42:
        raise _NoFrameSize("ends inside its JPEG 2000 SIZ marker segment")
    x, y, x0, y0 = struct.unpack_from(">4I", codestream, start + 8)
    components = struct.unpack_from(">H", codestream, start + 40)[0]
    return max(x - x0, 0) * max(y - y0, 0) * components


def _jp2_codestream_start(data: bytes) -> int:
    """Where the contents of a JP2 file's codestream box begin, found by stepping over the boxes before it."""
    position = 0
    for _ in range(MAX_HEADER_SEGMENTS):
        if len(data) < position + 8:
            raise _NoFrameSize("is a JP2 file that ends before its JPEG 2000 codestream box")
        length, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if length == 1 and len(data) >= position + 16:  # the box's length follows as 64 bits
            length, header = struct.unpack_from(">Q", data, position + 8)[0], 16
        if kind == b"jp2c":
            return position + header
        if length < header:  # 0 means "to the end of the file": no codestream box would follow
            raise _NoFrameSize(f"is a JP2 file with a box of length {length} before its JPEG 2000 codestream")
        position += length
    raise _NoFrameSize(f"is a JP2 file without a codestream box within its first {MAX_HEADER_SEGMENTS} boxes")


_JPEG_FILL = re.compile(rb"\xff+")
# SOF0-3, 5-7, 9-11, 13-15 (ISO 10918-1 B.1.1.3), DHP (a hierarchical image's size, laid out alike), JPEG-LS SOF55
_JPEG_FRAME_HEADERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xDE, 0xF7})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length follows
_JPEG_BEFORE_FRAME_FORBIDDEN = frozenset({0x00, 0xD8, 0xD9, 0xDA})  # not a marker, SOI, EOI, SOS
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_DECLARED_SAMPLES = {
    **dict.fromkeys([*pydicom.uid.JPEGTransferSyntaxes, *pydicom.uid.JPEGLSTransferSyntaxes], jpeg_samples),
    **dict.fromkeys(pydicom.uid.JPEG2000TransferSyntaxes, j2k_samples),
}


INFLATE_STEP = 1 << 20  # the most inflated bytes held at a time, beyond what a read returns, while a data set inflates
INFLATED_HINT = "raise the decode limits (medtriage serve --max-decoded-bytes) if it is genuine"


def inflated_limit(limits: DecodeLimits) -> int:
    """What a deflated data set may inflate to under `limits`: the pixels they allow, plus `HEADER_BYTES`."""
    return limits.max_decoded_bytes + HEADER_BYTES


def check_inflated_size(fp: BinaryIO, limits: DecodeLimits, where: str, *, allowed: int | None = None, hint: str | None = None) -> None:
    """A Deflated Explicit VR Little Endian file is inflated whole by pydicom before any element is read, and deflate
    expands up to ~1000-fold: a 1 MB file can become 1 GB. Inflate it here in bounded chunks, counting only, and refuse
    a data set larger than `allowed` (default: `inflated_limit(limits)`) with ImageTooLargeError, `hint` saying which
    option raises it. Leaves `fp` where it was; files of other transfer syntaxes, or unreadable ones, are left to
    pydicom."""
    start = fp.tell()
    try:
        data_set = inflating_reader(fp, inflated_limit(limits) if allowed is None else allowed, where, hint)
        while data_set is not None and data_set.read(INFLATE_STEP):
            pass
    except ImageTooLargeError:
        raise
    except Exception:  # a damaged header or stream: pydicom reports it with its own reason
        return
    finally:
        fp.seek(start)


def inflating_reader(fp: BinaryIO, allowed: int | None = None, where: str = "", hint: str | None = None) -> InflatingReader | None:
    """The data set of a deflated Part 10 file in `fp`, as a file that inflates it as it is read (`fp` moves on as it
    does), refusing to inflate more than `allowed` bytes; None, `fp` left where it was, for a file of another transfer
    syntax or an unreadable file meta."""
    start = fp.tell()
    if _at_deflated_data_set(fp):
        return InflatingReader(fp, allowed, where, hint)
    fp.seek(start)
    return None


class InflatingReader:
    """A deflated data set as a forward-reading file: read(n) inflates n bytes more, a seek ahead inflates and drops
    what it passes, a seek back reaches only the last KEEP bytes. It holds what one read returns (inflated straight into
    it: a large element is not held twice), KEEP and a few INFLATE_STEPs on the way, however far the data set reaches:
    pydicom inflates one whole before reading an element. Past `allowed` inflated bytes (where given) a read raises
    ImageTooLargeError, and a file ending before its deflate stream does DicomError, each kept in `refused` for the
    caller: pydicom turns some errors of a read into an OSError, and takes an EOFError for the data set's end."""

    KEEP = 64 << 10  # pydicom steps back a few bytes at a time (an element's header, a delimiter search)

    def __init__(self, fp: BinaryIO, allowed: int | None = None, where: str = "", hint: str | None = None):
        self._fp, self._inflater = fp, zlib.decompressobj(-zlib.MAX_WBITS)
        self._window, self._end, self._position = bytearray(), 0, 0  # the last bytes inflated, ending at _end
        self._allowed, self._where, self._hint = allowed, where, hint or INFLATED_HINT
        self.refused: DicomError | None = None  # ImageTooLargeError, or the stream cut short

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence not in (0, 1):
            raise OSError("a deflated data set cannot be read from its end before it is inflated")
        target = offset + (self._position if whence == 1 else 0)
        if target < self._end - len(self._window):
            raise OSError(f"cannot step back to byte {target} of a deflated data set, once inflated past it")
        self._position = target
        return target

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:  # the rest would be inflated whole
            raise OSError("a deflated data set is read by sizes, never whole")
        while self._end < self._position and self._inflate(self._position - self._end):  # a seek ahead: passed over
            pass
        out = io.BytesIO()
        with memoryview(self._window) as held:  # inflated already: read ahead, or stepped back over
            first = self._position - (self._end - len(held))
            self._position += out.write(held[first : first + n])
        while out.tell() < n and (chunk := self._inflate(n - out.tell())):
            self._position += out.write(memoryview(chunk)[: n - out.tell()])  # the rest stays in the window
        return out.getvalue()  # the buffer it was written to, not a copy

    def _inflate(self, wanted: int) -> bytes:
        """The next inflated bytes, at least KEEP where `wanted` is less (read ahead), at most INFLATE_STEP; b"" at the
        end of the data set. They join the window, which first drops what lies more than KEEP before the position."""
        chunk = b""
        while not chunk and not self._inflater.eof:
            data = self._inflater.unconsumed_tail or self._fp.read(1 << 16)
            if not data:  # the file ends inside the deflate stream: what came out is not the whole data set
                self.refused = DicomError(
                    "the deflated data set is cut short: the file ends before its deflate stream does",
                    where=self._where,
                    hint="the file is incomplete: send or copy it again from its source",
                )
                raise self.refused
            chunk = self._inflater.decompress(data, min(max(wanted, self.KEEP), INFLATE_STEP))
        if self._allowed is not None and self._end + len(chunk) > self._allowed:
            self.refused = ImageTooLargeError(
                f"the deflated data set inflates to more than {self._allowed} bytes", where=self._where, hint=self._hint
            )
            raise self.refused
        del self._window[: max(self._position - self.KEEP - (self._end - len(self._window)), 0)]  # before it grows
        self._window += chunk
        self._end += len(chunk)
        return chunk


def _at_deflated_data_set(fp: BinaryIO) -> bool:
    """Whether `fp` holds a Part 10 file whose data set is deflated, read as pydicom reads it; `fp` is then at the data
    set. False for an unreadable file meta (pydicom reports it)."""
    try:
        pydicom.filereader.read_preamble(fp, True)
        meta = pydicom.filereader._read_file_meta_info(fp)
    except Exception:
        return False
    return meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
