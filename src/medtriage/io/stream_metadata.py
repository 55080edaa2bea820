"""Metadata inside compressed frames, removed without touching the coded image.

A modality or a converter can write text into the codestream beside the image: comment (COM) and application (APPn:
EXIF, XMP, ICC, Photoshop) marker segments in JPEG (ITU-T T.81) and JPEG-LS (T.87) frames, comment segments in the
main and tile-part headers of a JPEG 2000 codestream, and XML, UUID, reader requirements and other boxes in a JP2 file
around one, in its header box too, and an ICC profile in its colour box. Any of them can hold a patient's name, a date
or a device serial, which header de-identification never sees.

A frame is walked by the lengths its segments declare, each checked against the frame's end. What decoding needs stays:
every JPEG table, frame and scan header, the JFIF and Adobe segments (they say how colour is converted), CharLS's colour
transform, every JPEG 2000 marker but COM, and a JP2 file's signature, file type, header and codestream boxes, each cut
to the fields a reader reads (a colour box to an enumerated colour space). Entropy-coded data is copied as it is, so
decoding gives the same pixels.
A frame that cannot be walked (no start marker, a length past its end) raises `DamagedFrame`: where its metadata lies
is then unknown, and nothing is guessed. A frame cut short inside its coded data is left to the pixel checks, which
report it as truncated. Frames in any other encapsulated syntax (video, JPEG XL, private ones) are not walked:
`unwalked_stream` says why such a file cannot be cleaned. numpy/pydicom only.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import pydicom

from medtriage.io.decode_limits import number_of_frames
from medtriage.io.encapsulation import (
    Frame,
    MalformedItems,
    every_frame,
    extended_offsets,
    frame_bytes,
    frame_length,
    item_end,
    reencapsulated,
)

JPEG_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (*range(50, 67), 70))  # the retired processes too
JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
J2K_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203))  # HTJ2K too
STREAM_SYNTAXES = JPEG_SYNTAXES | JPEG_LS_SYNTAXES | J2K_SYNTAXES
# Encapsulated, yet samples only: RLE segments (PS3.5 G) and Encapsulated Uncompressed (A.4.11) have no marker, box or
# message meant to carry text, so there is nothing to walk. A frame can still hide bytes no decoder reads (an RLE
# frame in its header's unused offsets, before its first segment, past a segment's samples; an uncompressed one past
# its samples): `damaged_frame` looks for those.
RLE_SYNTAX = "1.2.840.10008.1.2.5"
ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"
SAMPLES_ONLY_SYNTAXES = frozenset({RLE_SYNTAX, ENCAPSULATED_UNCOMPRESSED})
_RLE_HEADER = 64  # the number of segments and 15 offsets, each a 32-bit little-endian integer (PS3.5 G.5)
_SIZE_NAMES = {"Rows": "Rows", "Columns": "Columns", "SamplesPerPixel": "Samples per Pixel", "BitsAllocated": "Bits Allocated"}
_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})
# Where the streams a site may send carry text beside their pictures: (syntaxes and their fragmentable forms, codec,
# what holds the text). JPEG XL's syntaxes are newer than some pydicom releases, which then know no name for them.
_UNWALKED_TEXT = (
    (("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101"), "MPEG-2 video", "its user data"),
    (tuple(f"1.2.840.10008.1.2.4.{n}" for n in range(102, 107)), "H.264 video", "its SEI messages"),
    (("1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"), "HEVC video", "its SEI messages"),
    (("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112"), "JPEG XL", "its Exif, XMP and other boxes"),
)
_CONVERT = (
    "convert it to an uncompressed, JPEG or JPEG 2000 transfer syntax before ingest (e.g. gdcmconv --raw IN OUT, where "
    "GDCM decodes it), or have the source system send it so (video as still frames)"
)

_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and the restart markers: no length follows
# Application segments a decoder reads: JFIF and Adobe say whether the samples are YCbCr; CharLS reads its colour
# transform (JPEG-LS only) from APP8. Every other APPn, and every COM, is metadata.
_DECODING_APPS = {0xE0: b"JFIF\0", 0xEE: b"Adobe"}
_DECODING_APPS_LS = {**_DECODING_APPS, 0xE8: b"mrfx"}
# Their parameters' sizes: a longer segment carries more (a JFIF thumbnail, or bytes any writer may append), which no
# decoder reads and which can be anything, so only this much of it stays. A JFIF thumbnail's size is zeroed with it.
_DECODING_APP_SIZES = {b"JFIF\0": 14, b"Adobe": 12, b"mrfx": 5}
_NO_THUMBNAIL = b"\0\0"
# Entropy-coded data runs to the next marker: 0xFF then a code that is not stuffing (0x00 in JPEG, any byte below 0x80
# in JPEG-LS), not a restart marker (those lie inside it) and not a fill byte.
_NEXT_MARKER = re.compile(rb"\xff+[\x01-\xcf\xd8-\xfe]")
_NEXT_MARKER_LS = re.compile(rb"\xff+[\x80-\xcf\xd8-\xfe]")
_PADDING = b"\0\xff"  # what may follow the end marker: even-length padding (0x00, some writers 0xFF)

_SOT, _SOD, _EOC, _J2K_COM, _TLM = 0x90, 0x93, 0xD9, 0x64, 0x55
_JP2_SIGNATURE = b"\0\0\0\x0cjP  \r\n\x87\n"
# The boxes a JP2 reader needs: signature (the first box only), file type (`_file_type`), header (size, colour,
# palette) and codestream. Reader Requirements (JPX, T.801 I.7.2) goes: JP2 readers (OpenJPEG, which pydicom's plugin,
# imagecodecs and GDCM use) never read it, and its masks and vendor UUIDs are bytes no check can tell from text.
_JP2_KEPT = frozenset({b"ftyp", b"jp2h", b"jp2c"})
# What the JP2 Header box may hold (T.800 I.5.3): image header, bit depths, colour (`_colour`), palette, component
# mapping, channel definitions, resolution (a superbox of capture and display resolution: numbers only, kept whole).
_JP2_HEADER_KEPT = frozenset({b"ihdr", b"bpcc", b"colr", b"pclr", b"cmap", b"cdef", b"res "})
# The JPEG 2000 family's brands (JP2, JPX and its baseline, JPM, Motion JPEG 2000, HTJ2K's JPH and JHC): a File Type
# box's other codes name nothing a reader looks for, and four bytes each can spell a name.
_JP2_BRANDS = frozenset({b"jp2 ", b"jpx ", b"jpxb", b"jpm ", b"mjp2", b"mj2s", b"jph ", b"jhc "})
_ENUMERATED, _SRGB, _GREYSCALE = 1, 16, 17  # colour specification method and colour spaces (T.800 I.5.3.3)
_IMAGE_STARTS = (b"\xff\xd8", b"\xff\x4f\xff\x51", _JP2_SIGNATURE)  # JPEG and JPEG-LS, a J2K codestream, a JP2 file


class DamagedFrame(ValueError):
    """A frame whose segments cannot be walked to find its metadata (the message says where and why)."""


class FramesUnknown(ValueError):
    """A Number of Frames that cannot say how fragments group into frames."""


class _Edit(NamedTuple):
    start: int
    stop: int
    replacement: bytes = b""


@dataclass
class _Walk:
    """What one frame's walk found: the edits that clean it and what they remove."""

    edits: list[_Edit] = field(default_factory=list)
    removed: Counter = field(default_factory=Counter)

    def remove(self, start: int, stop: int, kind: str) -> None:
        self.edits.append(_Edit(start, stop))
        self.removed[kind] += 1

    def removed_bytes(self, since: int) -> int:
        return sum(e.stop - e.start - len(e.replacement) for e in self.edits[since:])


@dataclass(frozen=True)
class Stripped:
    """A data set's pixel data with its frames' metadata removed, the Extended Offset Table to go with it (None where
    the decoders use none), and what was removed, by kind (COM, APP1, JP2 xml...)."""

    pixel_data: bytes
    extended: tuple[bytes, bytes] | None
    removed: Counter


def stripped_pixel_data(ds: pydicom.Dataset, syntax: str) -> Stripped | None:
    """`ds`'s encapsulated pixel data without the metadata in its frames; None where there is none to remove (or no
    codestream syntax). Frames without metadata keep their items byte for byte. Raises DamagedFrame (a frame past
    Number of Frames among them: `frames_past_count`), MalformedItems or FramesUnknown."""
    found = _cleaned_frames(ds, syntax)
    if found is None or not found[1]:
        return None
    frames, cleaned, removed = found
    extended = extended_offsets(ds) is not None
    pixel_data, table = reencapsulated(ds.PixelData, frames, cleaned, extended)
    return Stripped(pixel_data, table, removed)


def damaged_frame(ds: pydicom.Dataset, syntax: str) -> str | None:
    """Why a frame of `ds` cannot be walked to its metadata, lies past Number of Frames (`frames_past_count`), or (RLE,
    Encapsulated Uncompressed) holds bytes no decoder reads or has no known size; None where every frame can and none
    does. Items that cannot be walked and an unusable Number of Frames give None too: the pixel checks refuse those,
    under their own reasons."""
    try:
        if syntax == RLE_SYNTAX:
            _rle_frames(ds)
        elif syntax == ENCAPSULATED_UNCOMPRESSED:
            _uncompressed_frames(ds)
        else:
            _cleaned_frames(ds, syntax)
    except DamagedFrame as err:
        return str(err)
    except (MalformedItems, FramesUnknown):
        pass
    return None


def frames_past_count(ds: pydicom.Dataset, syntax: str) -> str | None:
    """Why `ds`'s encapsulated pixel data (a walked or samples-only syntax) holds a frame past Number of Frames, or None
    where it holds no more (or where frames cannot be told apart: the pixel checks refuse those items)."""
    if syntax not in STREAM_SYNTAXES | SAMPLES_ONLY_SYNTAXES or "PixelData" not in ds:
        return None
    try:
        _counted_frames(ds, syntax)
    except DamagedFrame as err:
        return str(err)
    except (MalformedItems, FramesUnknown):
        pass
    return None


def _counted_frames(ds: pydicom.Dataset, syntax: str) -> list[Frame]:
    """Every frame the items hold (`every_frame`); raises DamagedFrame where there are more than Number of Frames.
    Viewers and the training loader read that many frames and no more: a frame past them is a whole picture (a face,
    a scanned form with a name) that nobody sees, and removing it would change the pixel data unasked."""
    claimed = _claimed(ds)
    frames = every_frame(ds, claimed, fragment_a_frame=syntax in SAMPLES_ONLY_SYNTAXES)
    if len(frames) > claimed:
        raise DamagedFrame(
            f"frame {claimed + 1} of the {len(frames)} frames its pixel data holds lies past Number of Frames "
            f"({claimed}): no viewer or loader shows it, so what it shows (a face, a scanned form with a name) would "
            "reach the pool unseen"
        )
    return frames


def unwalked_stream(ds: pydicom.Dataset, syntax: str | None) -> str | None:
    """Why `ds`'s pixel data cannot be cleaned: encapsulated in a syntax whose stream is not walked (video, JPEG XL,
    JPIP, a private one...), so text in it cannot be found; None where it is walked, samples only, native, or absent.
    An unknown syntax counts as encapsulated where its Pixel Data is (undefined length); otherwise the pixel checks
    judge it."""
    if "PixelData" not in ds or not syntax or syntax in STREAM_SYNTAXES | SAMPLES_ONLY_SYNTAXES | _NATIVE_SYNTAXES:
        return None
    uid = pydicom.uid.UID(str(syntax))
    known = uid.is_transfer_syntax and not uid.is_private
    if not (known and uid.is_encapsulated) and not ds["PixelData"].is_undefined_length:
        return None
    codec, carrier = next(
        ((codec, carrier) for family, codec, carrier in _UNWALKED_TEXT if any(uid == f or uid.startswith(f + ".") for f in family)),
        (uid.name if known else "a private transfer syntax" if uid.is_private else "an unknown transfer syntax", "its stream"),
    )
    return (
        f"pixel data in {codec} ({uid}): {carrier} can hold text such as a patient's name, and de-identification does "
        f"not walk this stream to remove it; {_CONVERT}"
    )


def _rle_frames(ds: pydicom.Dataset) -> None:
    """Raises DamagedFrame for an RLE frame holding bytes that no decoder reads, where text would pass unseen, and for
    frames whose size (Rows, Columns) is unknown, as `_uncompressed_frames` does. A frame a decoder would refuse (a bad
    header, a segment shorter than its samples) is left to the pixel checks."""
    if "PixelData" not in ds:
        return
    rows, columns = _sizes(ds, "Rows", "Columns")  # a segment's samples: without them, unread bytes cannot be told
    data = ds.PixelData
    for index, frame in enumerate(_counted_frames(ds, RLE_SYNTAX)):
        try:
            _item_tail(data, frame)
            _rle_unread_bytes(bytes(frame_bytes(data, frame)), rows * columns)
        except DamagedFrame as err:
            raise DamagedFrame(f"frame {index + 1}: {err}") from None


def _rle_unread_bytes(frame: bytes, samples: int) -> None:
    """An RLE frame whose segments each decode to `samples` bytes, with nothing unread around them but one pad byte per
    segment (each is padded to even length)."""
    if len(frame) < _RLE_HEADER:
        return
    count, *offsets = struct.unpack_from("<16L", frame)
    if not 1 <= count <= 15:
        return
    if any(offsets[count:]):
        raise DamagedFrame("its RLE header gives offsets to segments it does not have (PS3.5 G.5: they are zero)")
    if offsets[0] > _RLE_HEADER:
        raise DamagedFrame(f"{offsets[0] - _RLE_HEADER} bytes lie between its RLE header and its first segment")
    for segment, (start, end) in enumerate(zip(offsets[:count], [*offsets[1:count], len(frame)]), 1):
        used = _packbits_end(frame, start, end, samples) if _RLE_HEADER <= start <= end else None
        if used is not None and end - used > 1:
            raise DamagedFrame(f"RLE segment {segment} holds {end - used} bytes past its {samples} samples")


def _packbits_end(frame: bytes, start: int, end: int, samples: int) -> int | None:
    """Where the PackBits run that starts at `start` has given `samples` bytes; None where it ends first."""
    position, produced = start, 0
    while produced < samples:
        if position >= end:
            return None
        header = frame[position]
        if header < 128:  # a literal run of header + 1 bytes
            produced, position = produced + header + 1, position + header + 2
        elif header > 128:  # one byte repeated 257 - header times
            produced, position = produced + 257 - header, position + 2
        else:  # 128: no operation
            position += 1
    return position if position <= end else None


def _uncompressed_frames(ds: pydicom.Dataset) -> None:
    """Raises DamagedFrame for an Encapsulated Uncompressed frame (PS3.5 A.4.11: a fragment holding one frame's native
    samples, padded to even length) of any other length. A decoder reads the samples and no further, so bytes past
    them would pass unseen; a frame too short for its samples is refused by every decoder, yet its bytes would still be
    pooled."""
    if "PixelData" not in ds:
        return
    size, data = _native_frame_size(ds), ds.PixelData
    for index, frame in enumerate(_counted_frames(ds, ENCAPSULATED_UNCOMPRESSED)):
        try:
            _item_tail(data, frame)
            _samples_only(frame_length(data, frame), size)
        except DamagedFrame as err:
            raise DamagedFrame(f"frame {index + 1}: {err}") from None


def _native_frame_size(ds: pydicom.Dataset) -> int:
    """Bytes of one frame's samples as the native encoding lays them out: 1-bit samples packed, the frame ending on
    a byte (each frame has a fragment of its own); YBR_FULL_422 two samples a pixel (PS3.3 C.7.6.3.1.2)."""
    rows, columns, samples, bits = _sizes(ds, "Rows", "Columns", "SamplesPerPixel", "BitsAllocated")
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" and samples == 3:
        samples = 2
    return -(-rows * columns * samples * bits // 8)


def _sizes(ds: pydicom.Dataset, *keywords: str) -> list[int]:
    """The header's numbers a frame's size is made of; raises DamagedFrame where one is missing or not a positive
    number: without the size, a frame's samples cannot be told from bytes after them that no decoder reads."""
    values = [ds.get(keyword) for keyword in keywords]
    unusable = [_SIZE_NAMES[k] for k, value in zip(keywords, values) if not (isinstance(value, int) and value > 0)]
    if unusable:
        raise DamagedFrame(f"its frames' size cannot be known: {', '.join(unusable)} missing or not a positive number")
    return values


def _samples_only(length: int, size: int) -> None:
    """A frame of `size` bytes of samples, and a pad byte where that is odd."""
    if length < size:
        raise DamagedFrame(f"holds {length} bytes, fewer than the {size} bytes of its samples")
    if length > size + size % 2:
        raise DamagedFrame(f"holds {length - size} bytes past the {size} bytes of its samples, which no decoder reads")


def _cleaned_frames(ds: pydicom.Dataset, syntax: str) -> tuple[list[Frame], dict[int, bytes], Counter] | None:
    if syntax not in STREAM_SYNTAXES or "PixelData" not in ds:
        return None
    data, frames = ds.PixelData, _counted_frames(ds, syntax)
    cleaned, removed = {}, Counter()
    for index, frame in enumerate(frames):
        codestream = bytes(frame_bytes(data, frame))
        if not codestream:
            continue  # a frame without fragments: nothing in it, and the pixel checks report it missing
        try:
            _item_tail(data, frame)
            walk = _walk(codestream, syntax)
        except DamagedFrame as err:
            raise DamagedFrame(f"frame {index + 1}: {err}") from None
        if walk.edits:
            cleaned[index] = _applied(codestream, walk.edits)
            removed += walk.removed
    return frames, cleaned, removed


def _item_tail(data: bytes, frame: Frame) -> None:
    """An Extended Offset Table's length may end a frame before its item does: what lies between is read by no decoder
    that goes by the table, and walked by nothing, so it may only be padding."""
    tail = data[frame.last.stop : item_end(data, frame.last)]
    if tail.translate(None, _PADDING):
        raise DamagedFrame(f"its item holds {len(tail)} bytes past the length its offset table gives it, not padding")


def _claimed(ds: pydicom.Dataset) -> int:
    try:
        count = number_of_frames(ds)
    except (ValueError, TypeError) as err:
        raise FramesUnknown(f"Number of Frames: {err}") from None
    if count < 1:
        raise FramesUnknown(f"Number of Frames {count} counts no frame")
    return count


def _walk(codestream: bytes, syntax: str) -> _Walk:
    if syntax in J2K_SYNTAXES:
        return _jp2(codestream) if codestream.startswith(_JP2_SIGNATURE) else _j2k(codestream)
    return _jpeg(codestream, syntax in JPEG_LS_SYNTAXES)


def _applied(data: bytes, edits: list[_Edit]) -> bytes:
    parts, position = [], 0
    for edit in sorted(edits):
        parts += [data[position : edit.start], edit.replacement]
        position = edit.stop
    return b"".join([*parts, data[position:]])


def _segment_end(data: bytes, at: int, limit: int, within: str = "the frame") -> int:
    """Where the marker segment at `at` (marker, 2-byte length counting itself, parameters) ends; checked."""
    if at + 4 > limit:
        raise DamagedFrame(f"ends inside the length of the marker segment at byte {at}")
    (length,) = struct.unpack_from(">H", data, at + 2)
    marker = data[at] << 8 | data[at + 1]
    if length < 2:
        raise DamagedFrame(f"marker segment {marker:04X} at byte {at} declares {length} bytes, less than its length field")
    if at + 2 + length > limit:
        raise DamagedFrame(f"marker segment {marker:04X} at byte {at} declares {length} bytes, past the end of {within} ({limit} bytes)")
    return at + 2 + length


def _padding_only(data: bytes, position: int, after: str) -> None:
    """After the end, only padding: anything else would reach the pool unread (another frame's image among it, where
    the fragments of a frame past Number of Frames are joined to the last one's)."""
    if data[position:].translate(None, _PADDING):
        image = data[position:].lstrip(b"\0").startswith(_IMAGE_STARTS)
        shown = " (another image starts there, which no decoder shows)" if image else ""
        raise DamagedFrame(f"holds {len(data) - position} bytes after {after} (byte {position}), not padding{shown}")


# ---------------------------------------------------------------- JPEG and JPEG-LS


def _jpeg(data: bytes, ls: bool) -> _Walk:
    if not data.startswith(b"\xff\xd8"):
        raise DamagedFrame("does not start with a start-of-image marker (FFD8)")
    walk, position = _Walk(), 2
    while position < len(data):
        start = position
        if data[position] != 0xFF:
            raise DamagedFrame(f"has no marker at byte {position}, where the segment before it ends")
        while position + 1 < len(data) and data[position + 1] == 0xFF:
            position += 1  # fill bytes before a marker
        if position + 1 >= len(data):
            break
        code, position = data[position + 1], position + 2
        if code == 0xD9:
            _padding_only(data, position, "its end-of-image marker")
            break
        if code == 0xD8:
            raise DamagedFrame(f"has a second start-of-image marker at byte {position - 2}")
        if code in _JPEG_STANDALONE:
            continue
        stop = _segment_end(data, position - 2, len(data))
        if _is_metadata(code, data[position + 2 : stop], ls):
            walk.remove(start, stop, "COM" if code == 0xFE else f"APP{code - 0xE0}")
        elif 0xE0 <= code <= 0xEF:
            _trim_kept(data, position - 2, stop, walk)
        position = stop if code != 0xDA else _after_scan(data, stop, ls)
    return walk


def _is_metadata(code: int, parameters: bytes, ls: bool) -> bool:
    if code == 0xFE:
        return True
    kept = (_DECODING_APPS_LS if ls else _DECODING_APPS).get(code)
    return 0xE0 <= code <= 0xEF and not (kept and parameters.startswith(kept))


def _trim_kept(data: bytes, at: int, stop: int, walk: _Walk) -> None:
    """A kept application segment cut to the parameters a decoder reads."""
    parameters = data[at + 4 : stop]
    name, size = next((name, size) for name, size in _DECODING_APP_SIZES.items() if parameters.startswith(name))
    if len(parameters) <= size:
        return
    kept = parameters[:12] + _NO_THUMBNAIL if name == b"JFIF\0" else parameters[:size]
    walk.edits.append(_Edit(at, stop, data[at : at + 2] + struct.pack(">H", 2 + size) + kept))
    walk.removed[f"APP{data[at + 1] - 0xE0} excess"] += 1


def _after_scan(data: bytes, position: int, ls: bool) -> int:
    """Where the marker after a scan's entropy-coded data starts; the frame's end where it is cut short inside it."""
    found = (_NEXT_MARKER_LS if ls else _NEXT_MARKER).search(data, position)
    return found.start() if found else len(data)


# ---------------------------------------------------------------- JPEG 2000


def _j2k(data: bytes) -> _Walk:
    if not data.startswith(b"\xff\x4f"):
        raise DamagedFrame("does not start with a start-of-codestream marker (FF4F) or a JP2 signature")
    walk, segments = _Walk(), []
    position, index = _j2k_header(data, 2, len(data), walk, (_SOT, _EOC), segments), 0
    tlm = _TileLengths(data, segments)
    while data.startswith(b"\xff\x90", position):
        position = _tile_part(data, position, index, walk, tlm)
        if position >= len(data):
            return walk  # the last tile-part runs to the end, or is cut short: nothing after it to walk
        index += 1
    if not data.startswith(b"\xff\xd9", position):
        raise DamagedFrame(f"tile-part {index} ends at byte {position}, where neither a tile-part nor the end marker starts")
    _padding_only(data, position + 2, "its end-of-codestream marker")
    return walk


def _j2k_header(data: bytes, position: int, limit: int, walk: _Walk, ends: tuple[int, ...], tlm: list | None) -> int:
    """Walks a main or tile-part header's marker segments up to one of the markers `ends`, returning its position;
    comments go, the main header's TLM segments (tile-part lengths, `tlm`) are noted for the tile-parts whose headers
    lose a comment. A TLM segment belongs to the main header alone (T.800 A.7.1): one in a tile-part header is no
    table of the codestream's, and `tlm` is None there."""
    within = "the frame" if limit == len(data) else "its tile-part"
    while True:
        if position + 2 > limit:
            raise DamagedFrame(f"ends inside a codestream header at byte {position}")
        if data[position] != 0xFF:
            raise DamagedFrame(f"has no marker at byte {position}, where the segment before it ends")
        code = data[position + 1]
        if code in ends:
            return position
        if 0x30 <= code <= 0x3F:  # reserved markers without parameters
            position += 2
            continue
        stop = _segment_end(data, position, limit, within)
        if code == _J2K_COM:
            walk.remove(position, stop, "COM")
        elif code == _TLM and tlm is not None:
            tlm.append((position, stop))
        position = stop


def _tile_part(data: bytes, sot: int, index: int, walk: _Walk, tlm: _TileLengths) -> int:
    """Walks the tile-part at `sot`, returning where the next one starts; a tile-part header that loses a comment
    gets its length (Psot), and the TLM entry for it, made shorter by as much."""
    header = _segment_end(data, sot, len(data))
    if header - sot != 12:
        raise DamagedFrame(f"has a tile-part header segment (SOT) of {header - sot - 2} bytes at byte {sot}, not 10")
    (psot,) = struct.unpack_from(">L", data, sot + 6)
    if psot and psot < 14:
        raise DamagedFrame(f"tile-part {index} at byte {sot} declares {psot} bytes, fewer than its own header")
    end = sot + psot if psot else len(data)  # 0: the last tile-part, running to the end marker
    before = len(walk.edits)
    _j2k_header(data, header, min(end, len(data)), walk, (_SOD,), None)
    shorter = walk.removed_bytes(before)
    if shorter:  # Psot 0 stays 0 (it has no length to change), but a TLM entry still gives this tile-part's length
        if psot:
            walk.edits.append(_Edit(sot + 6, sot + 10, struct.pack(">L", psot - shorter)))
        tlm.shorten(index, shorter, walk)
    return end


class _TileLengths:
    """The main header's TLM segments, their entries listed once, when a tile-part first needs its own: a codestream may
    hold thousands of tile-parts, each losing a comment."""

    def __init__(self, data: bytes, segments: list[tuple[int, int]]) -> None:
        self.data, self.segments, self.entries = data, segments, None

    def shorten(self, index: int, shorter: int, walk: _Walk) -> None:
        if self.entries is None:
            in_order = sorted(self.segments, key=lambda segment: self.data[segment[0] + 4 : segment[0] + 5])  # by Ztlm
            self.entries = [entry for segment in in_order for entry in _tlm_entries(self.data, *segment)]
        if index >= len(self.entries):  # a TLM listing fewer tile-parts says nothing of this one
            return
        at, size = self.entries[index]
        length = int.from_bytes(self.data[at : at + size], "big") - shorter
        if length < 0:
            raise DamagedFrame(f"its TLM segment gives tile-part {index} a length shorter than its header")
        walk.edits.append(_Edit(at, at + size, length.to_bytes(size, "big")))


def _tlm_entries(data: bytes, start: int, stop: int) -> list[tuple[int, int]]:
    """(position, size) of each tile-part length a TLM segment lists (Stlm gives the sizes of index and length)."""
    if stop - start < 6:
        raise DamagedFrame(f"has a TLM segment at byte {start} too short to say its entries' sizes")
    index_size, length_size = (data[start + 5] >> 4) & 3, 4 if data[start + 5] & 0x40 else 2
    width = index_size + length_size
    if index_size == 3 or (stop - start - 6) % width:
        raise DamagedFrame(f"has a TLM segment at byte {start} whose entries do not fill it")
    return [(at + index_size, length_size) for at in range(start + 6, stop, width)]


def _jp2(data: bytes) -> _Walk:
    """A JP2 file: boxes a reader needs stay, cut to their fields, the codestream is cleaned, the other boxes go."""
    walk, position, codestream = _Walk(), 0, None
    while position < len(data):
        if len(data) - position < 8:  # no room for a box: the fragment's padding
            _padding_only(data, position, "its last JP2 box")
            break
        header, stop = _box(data, position)
        kind = data[position + 4 : position + 8]
        _nothing_kept_after(codestream, kind, position)
        if kind == b"jp2c":
            codestream = position
            _codestream_box(data, position, header, stop, walk)
        elif kind == b"jp2h":
            _header_box(data, position, header, stop, walk)
        elif kind == b"ftyp":
            _file_type(data, position, header, stop, walk)
        elif kind not in _JP2_KEPT and position:  # the signature, 12 bytes (`_walk`), is the first box
            walk.remove(position, stop, f"JP2 {kind.decode('latin-1').strip()}")
        position = stop
    return walk


def _nothing_kept_after(codestream: int | None, kind: bytes, at: int) -> None:
    """Readers decode the first codestream box and read no box after it (the header belongs before it): a box that
    stays, there, would take another image (a second JP2 file's boxes, in a frame past Number of Frames joined to the
    last one) to the pool that no reader shows. Any other box there goes anyway."""
    if codestream is not None and kind in _JP2_KEPT:
        name = kind.decode("latin-1").strip()
        raise DamagedFrame(f"holds a JP2 {name} box at byte {at}, after its codestream box (byte {codestream}), which no reader reads")


def _box(data: bytes, at: int, limit: int | None = None, within: str = "the frame") -> tuple[int, int]:
    """(header size, end) of the box at `at`, which must end by `limit` (the end of the frame, or of the superbox
    holding it): a 32-bit length, 1 for a 64-bit one after the type, 0 to that end."""
    limit = len(data) if limit is None else limit
    if at + 8 > limit:
        raise DamagedFrame(f"ends inside the header of the JP2 box at byte {at}")
    (length,) = struct.unpack_from(">L", data, at)
    header = 8
    if length == 1:
        if at + 16 > limit:
            raise DamagedFrame(f"ends inside the header of the JP2 box at byte {at}")
        (length,), header = struct.unpack_from(">Q", data, at + 8), 16
    stop = at + length if length else limit
    if stop < at + header or stop > limit:
        raise DamagedFrame(f"JP2 box at byte {at} declares {length} bytes, past the end of {within} (byte {limit})")
    return header, stop


def _file_type(data: bytes, at: int, header: int, stop: int, walk: _Walk) -> None:
    """The File Type box as a reader reads it (T.800 I.5.2): a brand, a minor version, compatibility codes. Only the
    family's brands stay (an unknown brand becomes JP2's), each code once, and the version is 0, the only one they
    define: otherwise the box could be padded with codes spelling anything."""
    content = data[at + header : stop]
    if len(content) < 8:
        raise DamagedFrame(f"has a JP2 File Type box at byte {at} of {len(content)} bytes, too short for its brand and version")
    brand = content[:4] if content[:4] in _JP2_BRANDS else b"jp2 "
    listed = (content[offset : offset + 4] for offset in range(8, len(content) - 3, 4))
    codes = b"".join(dict.fromkeys(code for code in listed if code in _JP2_BRANDS))
    rebuilt = struct.pack(">L4s4sL", 16 + len(codes), b"ftyp", brand, 0) + codes
    if rebuilt != data[at:stop]:
        walk.edits.append(_Edit(at, stop, rebuilt))
        walk.removed["JP2 ftyp excess"] += 1


class _Child(NamedTuple):
    """A box inside a superbox: its type, where it starts, where its content starts, where it ends."""

    kind: bytes
    start: int
    content: int
    end: int


def _children(data: bytes, position: int, stop: int, within: str) -> list[_Child]:
    children = []
    while position < stop:
        header, end = _box(data, position, stop, within)
        children.append(_Child(data[position + 4 : position + 8], position, position + header, end))
        position = end
    return children


def _header_box(data: bytes, at: int, header: int, stop: int, walk: _Walk) -> None:
    """The JP2 Header is a superbox: a writer can nest a UUID or XML box in it beside the image header and colour, and
    run a child on past the fields a reader reads (`_header_child`)."""
    children = _children(data, at + header, stop, "the JP2 Header box")
    components, columns = _field(data, children, b"ihdr", 8, 2, 3), _field(data, children, b"pclr", 2, 1, 0)
    kept, removed = [], Counter()
    for child in children:
        box, change = _header_child(data, child, components, columns)
        kept.append(box)
        removed.update([change] if change else [])
    if removed:  # nothing removed: no edit, so the frame stays byte for byte
        walk.edits.append(_Edit(at, stop, _rebuilt(data, at, header, b"".join(kept))))
        walk.removed += removed


def _field(data: bytes, children: list[_Child], kind: bytes, offset: int, size: int, default: int) -> int:
    """A number in the first child of type `kind`: the image header's components (NC), a palette's columns (NPC)."""
    child = next((child for child in children if child.kind == kind), None)
    if child is None or child.end - child.content < offset + size:
        return default
    return int.from_bytes(data[child.content + offset : child.content + offset + size], "big")


def _header_child(data: bytes, child: _Child, components: int, columns: int) -> tuple[bytes, str | None]:
    """A JP2 Header child as it stays (b"": it goes), and what it lost (None: nothing). A reader reads each standard
    child's fields and no further (T.800 I.5.3): what follows them can hold anything, so it goes too."""
    name = f"JP2 {child.kind.decode('latin-1').strip()}"
    content, whole = data[child.content : child.end], data[child.start : child.end]
    if child.kind not in _JP2_HEADER_KEPT:
        return b"", name
    if child.kind == b"colr":
        return _colour(content, columns or components) or (whole, None)
    if child.kind == b"res ":
        return _resolution(data, child)
    size = _fields_size(child.kind, content, components, columns)
    return (whole, None) if len(content) <= size else (_box_of(child.kind, content[:size]), f"{name} excess")


def _fields_size(kind: bytes, content: bytes, components: int, columns: int) -> int:
    """How many bytes of a JP2 Header child's content a reader reads (T.800 I.5.3): the image header's 14; a bit depth
    a component (bpcc); a palette's entry count, column count, depths and entries (pclr); 4 bytes a channel, at most
    each palette column and each other component (cmap); a count and 6 bytes a channel (cdef). A child too short for
    them is left to the decoders, which refuse it."""
    if kind == b"ihdr":
        return 14
    if kind == b"bpcc":
        return components
    if kind == b"pclr":
        own = content[2] if len(content) > 2 else 0
        return 3 + own + int.from_bytes(content[:2], "big") * sum((depth & 0x7F) // 8 + 1 for depth in content[3 : 3 + own])
    if kind == b"cmap":
        return 4 * min(len(content) // 4, columns + max(components - 1, 0))
    return 2 + 6 * int.from_bytes(content[:2], "big")  # cdef


def _resolution(data: bytes, child: _Child) -> tuple[bytes, str | None]:
    """The Resolution superbox holds capture and display resolution, 10 bytes of numbers each (T.800 I.5.3.7); any
    other child, and bytes past those 10, go."""
    inner = _children(data, child.content, child.end, "the Resolution box")
    exact = all(box.kind in (b"resc", b"resd") and box.end - box.content == 10 for box in inner)
    if exact:
        return data[child.start : child.end], None
    kept = [_box_of(box.kind, data[box.content : box.content + 10]) for box in inner if box.kind in (b"resc", b"resd")]
    return _box_of(b"res ", b"".join(kept)), "JP2 res excess"


def _colour(content: bytes, channels: int) -> tuple[bytes, str] | None:
    """A colour box as one with an enumerated colour space (T.800 I.5.3.3: method, precedence, approximation, then the
    4-byte space), and what it lost; None where it is one already. Bytes after the space go (a CIELab's optional
    parameters among them: their defaults stand in). An ICC profile (method 2, or JPX's 3) is replaced by greyscale or
    sRGB, by the channels the image decodes to: its description, copyright, device and private tags are free text, and
    no decoder the pool uses applies it (OpenJPEG hands it on; DICOM's colour is the data set's Photometric
    Interpretation and ICC Profile), so the samples decode the same. Any other method (JPX's vendor and parameterised
    ones) likewise."""
    method = content[0] if content else 0
    if method == _ENUMERATED and len(content) >= 7:
        return None if len(content) == 7 else (_box_of(b"colr", content[:7]), "JP2 colr excess")
    space = _GREYSCALE if channels < 3 else _SRGB
    replaced = _box_of(b"colr", struct.pack(">BBBL", _ENUMERATED, 0, 0, space))
    return replaced, "JP2 colr ICC" if method in (2, 3) else f"JP2 colr method {method}"


def _box_of(kind: bytes, content: bytes) -> bytes:
    return struct.pack(">L", 8 + len(content)) + kind + content


def _codestream_box(data: bytes, at: int, header: int, stop: int, walk: _Walk) -> None:
    inner = _j2k(data[at + header : stop])
    if not inner.edits:
        return
    codestream = _applied(data[at + header : stop], inner.edits)
    walk.edits.append(_Edit(at, stop, _rebuilt(data, at, header, codestream)))
    walk.removed += inner.removed


def _rebuilt(data: bytes, at: int, header: int, content: bytes) -> bytes:
    """The box at `at` holding `content` instead, its length in the form it had."""
    (length,), kind = struct.unpack_from(">L", data, at), data[at + 4 : at + 8]
    if length == 0:  # to the end of the file: no length to change
        return data[at : at + header] + content
    if header == 8:
        return struct.pack(">L", 8 + len(content)) + kind + content
    return struct.pack(">L", 1) + kind + struct.pack(">Q", 16 + len(content)) + content
