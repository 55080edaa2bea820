"""Metadata inside compressed frames, removed without touching the coded image.

A modality or a converter can write text into the codestream beside the image: comment (COM) and application (APPn:
EXIF, XMP, ICC, Photoshop) marker segments in JPEG (ITU-T T.81) and JPEG-LS (T.87) frames, comment segments in the
main and tile-part headers of a JPEG 2000 codestream, and XML, UUID, reader requirements and other boxes in a JP2 file
around one, in its header box too, and an ICC profile in its colour box. Any of them can hold a patient's name, a date
or a device serial, which header de-identification never sees.

A frame is walked by the lengths its segments declare, each checked against the frame's end. What decoding needs stays:
every JPEG table, frame and scan header, the JFIF and Adobe segments (they say how colour is converted), CharLS's colour
transform, every JPEG 2000 marker but COM, and a JP2 file's signature, file type, header and codestream boxes, each cut
to the fields a reader reads (a colour box to an enumerated colour space). Each value the header's boxes keep is checked
against its bounds (T.800 Annex I) and the codestream's SIZ segment: where a decoder reads one wrong, or the header holds
a palette, the frame is refused as damaged; a resolution out of bounds goes. Entropy-coded data is copied as it is, so
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
    shared,
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
# The boxes a JP2 reader needs: signature (the first box only), file type (`_file_type`), header (size, depths, colour)
# and codestream. Reader Requirements (JPX, T.801 I.7.2) goes: JP2 readers (OpenJPEG, which pydicom's plugin,
# imagecodecs and GDCM use) never read it, and its masks and vendor UUIDs are bytes no check can tell from text.
_JP2_KEPT = frozenset({b"ftyp", b"jp2h", b"jp2c"})
# What the JP2 Header box may hold (T.800 I.5.3) and keeps: image header, bit depths, colour (`_colour`), channel
# definitions, resolution (a superbox of capture and display resolution, `_resolution`). Each value a decoder reads is
# checked against its bounds (Annex I) and the codestream (`_image`, `_matches_codestream`). A palette and its component
# mapping (pclr, cmap) are refused: they make a decoder's output more samples than the codestream has.
_JP2_HEADER_KEPT = frozenset({b"ihdr", b"bpcc", b"colr", b"cdef", b"res "})
_JP2_PALETTE = frozenset({b"pclr", b"cmap"})
_JP2_HEADER_ONCE = (b"ihdr", b"bpcc", b"cdef")  # one each at most (colour may repeat; a second resolution box goes)
_MAX_COMPONENTS = 16384  # NC (T.800 I.5.3.1)
_MAX_DEPTH = 37  # a bit depth's low 7 bits: the depth less one, 1 to 38 bits; the high bit says signed (I.5.3.1)
_VARYING_DEPTHS = 255  # BPC where the components' depths differ: a Bits Per Component box gives them
_COMPRESSION_J2K = 7  # C: the only compression type JP2 defines
_CHANNEL_TYPES = frozenset({0, 1, 2, 0xFFFF})  # colour, opacity, premultiplied opacity, unspecified (I.5.3.6)
_WHOLE_IMAGE, _UNASSOCIATED = 0, 0xFFFF  # a channel's association besides colour 1 to N
# Enumerated colour spaces JP2 (16 sRGB, 17 greyscale, 18 sYCC) and JPX (T.801 M.11.7.2) define, and the most
# approximate a JPX colour may say it is (APPROX 0 to 4): another value is no colour space any reader knows.
_ENUMERATED_SPACES = frozenset({0, 1, 3, 4, 9, *range(11, 25)})
_MAX_APPROXIMATION = 4
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
    removed = Counter(removed)  # its own: the walk's may be shared (`_cleaned_frames`)
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
    """Each frame's codestream walked: the frames, the cleaned ones by index, what was removed. Ingest asks twice (is a
    frame damaged, then the cleaning): within `frames_split_once` the walk is done once (`shared`), keyed by all it
    reads of `ds` besides the pixel data."""
    if syntax not in STREAM_SYNTAXES or "PixelData" not in ds:
        return None
    key = ("cleaned", syntax, _claimed(ds), *(extended_offsets(ds) or ()))
    return shared(ds.PixelData, key, lambda: _walked_frames(ds, syntax))


def _walked_frames(ds: pydicom.Dataset, syntax: str) -> tuple[list[Frame], dict[int, bytes], Counter]:
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
    """A JP2 file: boxes a reader needs stay, cut to their fields, the codestream is cleaned, the other boxes go. The
    header must come before the codestream (T.800 I.4) and describe it (`_matches_codestream`)."""
    walk, position, codestream, image = _Walk(), 0, None, None
    while position < len(data):
        if len(data) - position < 8:  # no room for a box: the fragment's padding
            _padding_only(data, position, "its last JP2 box")
            break
        header, stop = _box(data, position)
        kind = data[position + 4 : position + 8]
        _nothing_kept_after(codestream, kind, position)
        if kind == b"jp2c":
            if image is None:
                raise DamagedFrame(f"has a JP2 codestream box at byte {position} without a JP2 Header box before it")
            _matches_codestream(image, data[position + header : stop], position)
            codestream = position
            _codestream_box(data, position, header, stop, walk)
        elif kind == b"jp2h":
            if image is not None:
                raise DamagedFrame(f"has a second JP2 Header box at byte {position}: readers would differ on which they read")
            image = _header_box(data, position, header, stop, walk)
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


def _header_box(data: bytes, at: int, header: int, stop: int, walk: _Walk) -> _Image:
    """The JP2 Header is a superbox: a writer can nest a UUID or XML box in it beside the image header and colour, and
    run a child on past the fields a reader reads (`_header_child`). What it says of the image is checked first
    (`_image`): where that is out of bounds, nothing is kept."""
    children = _children(data, at + header, stop, "the JP2 Header box")
    image = _image(data, at, children)
    kept, removed, resolution = [], Counter(), False
    for child in children:
        if child.kind == b"res " and resolution:  # a second one: T.800 allows one, readers would differ on which
            box, changes = b"", ["JP2 res inconsistent"]
        else:
            box, changes = _header_child(data, child, image)
        resolution |= child.kind == b"res "
        kept.append(box)
        removed.update(changes)
    if removed:  # nothing removed: no edit, so the frame stays byte for byte
        walk.edits.append(_Edit(at, stop, _rebuilt(data, at, header, b"".join(kept))))
        walk.removed += removed
    return image


class _Image(NamedTuple):
    """What a JP2 Header says of its codestream: the image's size, and each component's bit depth as SIZ encodes it
    (the depth less one, 0x80 where signed); BPC as the image header gives it."""

    height: int
    width: int
    depths: tuple[int, ...]
    bpc: int


def _image(data: bytes, at: int, children: list[_Child]) -> _Image:
    """What the JP2 Header box at `at` says of the image, every value a decoder reads checked against its bounds (T.800
    I.5.3): raises DamagedFrame where one lies outside them, where a box it needs is missing or there twice, or where
    it holds a palette. Decoders would read such a header each their own way (OpenJPEG through imagecodecs refuses a
    channel definition naming a channel the image lacks, pydicom's OpenJPEG plugin decodes it), and the file cannot be
    made right without changing what the pixels decode to. Every size is checked against the box's bytes before
    anything is read by it."""
    for child in children:
        if child.kind in _JP2_PALETTE:
            raise DamagedFrame(
                f"has a palette (a JP2 {child.kind.decode('latin-1')} box at byte {child.start}): decoders expand each "
                "sample through it into several, more samples than its codestream has, and pydicom's OpenJPEG plugin "
                "writes them past the buffer it sized by the codestream; DICOM gives a palette in the data set (PALETTE "
                "COLOR), never in the frame"
            )
    counted = Counter(child.kind for child in children)
    for kind in _JP2_HEADER_ONCE:
        if counted[kind] > 1:
            name = kind.decode("latin-1")
            raise DamagedFrame(f"has {counted[kind]} JP2 {name} boxes in its JP2 Header box at byte {at}, where T.800 allows one")
    if not children or children[0].kind != b"ihdr":
        raise DamagedFrame(f"has a JP2 Header box at byte {at} whose first box is not an image header (T.800 I.5.3.1)")
    ihdr = children[0]
    if ihdr.end - ihdr.content < 14:
        raise DamagedFrame(f"has a JP2 image header at byte {ihdr.start} of {ihdr.end - ihdr.content} bytes, not its 14")
    height, width, components, bpc, compression, unknown, ipr = struct.unpack_from(">LLHBBBB", data, ihdr.content)
    for field_name, value, bounds, within in (
        ("height", height, "1 to 4294967295", height >= 1),
        ("width", width, "1 to 4294967295", width >= 1),
        ("components (NC)", components, f"1 to {_MAX_COMPONENTS}", 1 <= components <= _MAX_COMPONENTS),
        ("bit depth (BPC)", bpc, "1 to 38 bits, or 255", bpc == _VARYING_DEPTHS or bpc & 0x7F <= _MAX_DEPTH),
        ("compression type (C)", compression, "7", compression == _COMPRESSION_J2K),
        ("UnkC", unknown, "0 or 1", unknown <= 1),
        ("IPR", ipr, "0 or 1", ipr <= 1),
    ):
        if not within:
            raise DamagedFrame(f"has a JP2 image header at byte {ihdr.start} whose {field_name} is {value}, not {bounds} (T.800 I.5.3.1)")
    depths = (bpc,) * components if bpc != _VARYING_DEPTHS else _component_depths(data, children, components)
    channels = next((child for child in children if child.kind == b"cdef"), None)
    if channels is not None:
        _channel_definitions(data, channels, components)
    return _Image(height, width, depths, bpc)


def _component_depths(data: bytes, children: list[_Child], components: int) -> tuple[int, ...]:
    """Each component's bit depth from the Bits Per Component box, which an image header of BPC 255 needs (T.800
    I.5.3.2)."""
    box = next((child for child in children if child.kind == b"bpcc"), None)
    if box is None:
        raise DamagedFrame("has a JP2 image header saying its components' bit depths differ (BPC 255), and no Bits Per Component box")
    if box.end - box.content < components:
        raise DamagedFrame(
            f"has a JP2 bpcc box at byte {box.start} giving {box.end - box.content} bit depths for its {components} components"
        )
    depths = tuple(data[box.content : box.content + components])
    wrong = next((depth for depth in depths if depth & 0x7F > _MAX_DEPTH), None)
    if wrong is not None:
        raise DamagedFrame(f"has a JP2 bpcc box at byte {box.start} giving a bit depth {wrong}, not 1 to 38 bits (T.800 I.5.3.2)")
    return depths


def _channel_definitions(data: bytes, box: _Child, components: int) -> None:
    """A Channel Definition box (T.800 I.5.3.6) defining each of the image's channels once (without a palette, one per
    component), with a type and an association in their bounds."""
    content, at = data[box.content : box.end], box.start
    count = int.from_bytes(content[:2], "big") if len(content) >= 2 else 0
    if not count:
        raise DamagedFrame(f"has a JP2 cdef box at byte {at} that declares no channel")
    if 2 + 6 * count > len(content):
        raise DamagedFrame(
            f"has a JP2 cdef box at byte {at} that declares {count} channel definitions, with room for {(len(content) - 2) // 6}"
        )
    seen = set()
    for channel, kind, association in struct.iter_unpack(">HHH", content[2 : 2 + 6 * count]):
        if channel >= components:
            raise DamagedFrame(f"has a JP2 cdef box at byte {at} that defines channel {channel} of an image of {components} channels")
        if channel in seen:
            raise DamagedFrame(f"has a JP2 cdef box at byte {at} that defines channel {channel} twice")
        if kind not in _CHANNEL_TYPES:
            raise DamagedFrame(f"has a JP2 cdef box at byte {at} giving channel {channel} type {kind}, not 0, 1, 2 or 65535")
        if association not in (_WHOLE_IMAGE, _UNASSOCIATED) and association > components:
            raise DamagedFrame(
                f"has a JP2 cdef box at byte {at} associating channel {channel} with colour {association}, of {components} at most"
            )
        seen.add(channel)
    if len(seen) < components:
        raise DamagedFrame(f"has a JP2 cdef box at byte {at} that defines {len(seen)} of its {components} channels (T.800 I.5.3.6: each)")


def _matches_codestream(image: _Image, codestream: bytes, at: int) -> None:
    """Readers size the image, and read its components' depths, by the JP2 image header or by the codestream's SIZ
    segment: where the two disagree, each shows another image. A codestream without a whole SIZ segment right after
    its start marker is left to the decoders, which refuse it."""
    siz = _siz(codestream)
    if siz is None:
        return
    height, width, depths = siz
    said = f"its JP2 image header and its codestream box's SIZ segment (byte {at}) disagree on"
    if (image.height, image.width) != (height, width):
        raise DamagedFrame(f"{said} the image's size: height {image.height} and width {image.width}, or {height} and {width}")
    if len(image.depths) != len(depths):
        raise DamagedFrame(f"{said} its components: {len(image.depths)} components, or {len(depths)}")
    for index, (given, coded) in enumerate(zip(image.depths, depths)):
        if given != coded:
            raise DamagedFrame(f"{said} component {index + 1} as {_depth(given)}, or {_depth(coded)}")


def _depth(depth: int) -> str:
    return f"{(depth & 0x7F) + 1}-bit{' signed' if depth & 0x80 else ''}"


def _siz(codestream: bytes) -> tuple[int, int, tuple[int, ...]] | None:
    """(height, width, each component's depth) from the SIZ segment that follows the start of a codestream (T.800
    A.5.1: Lsiz, Rsiz, the reference grid and its offsets, tiles, Csiz, then Ssiz, XRsiz and YRsiz a component); None
    where there is none whole."""
    if not codestream.startswith(b"\xff\x4f\xff\x51") or len(codestream) < 42:
        return None
    (length,), (count,) = struct.unpack_from(">H", codestream, 4), struct.unpack_from(">H", codestream, 40)
    if length != 38 + 3 * count or len(codestream) < 4 + length:
        return None
    xsiz, ysiz, xoffset, yoffset = struct.unpack_from(">4L", codestream, 8)
    return ysiz - yoffset, xsiz - xoffset, tuple(codestream[42 : 42 + 3 * count : 3])


def _header_child(data: bytes, child: _Child, image: _Image) -> tuple[bytes, list[str]]:
    """A JP2 Header child as it stays (b"": it goes), and what it lost. A reader reads each standard child's fields
    and no further (T.800 I.5.3): what follows them can hold anything, so it goes too. The image header's IPR becomes
    0: the Intellectual Property box it announces is removed. A Bits Per Component box the image header does not use
    (it gives one depth for all) goes where it disagrees with that depth."""
    name = f"JP2 {child.kind.decode('latin-1').strip()}"
    content, whole = data[child.content : child.end], data[child.start : child.end]
    if child.kind not in _JP2_HEADER_KEPT:
        return b"", [name]
    if child.kind == b"colr":
        replaced = _colour(content, len(image.depths))
        return (whole, []) if replaced is None else (replaced[0], [replaced[1]])
    if child.kind == b"res ":
        return _resolution(data, child)
    components = len(image.depths)
    if child.kind == b"bpcc" and image.bpc != _VARYING_DEPTHS and content[:components] != bytes([image.bpc]) * components:
        return b"", [f"{name} inconsistent"]
    size = 2 + 6 * int.from_bytes(content[:2], "big") if child.kind == b"cdef" else components if child.kind == b"bpcc" else 14
    changes = [f"{name} excess"] if len(content) > size else []
    if child.kind == b"ihdr" and content[13]:
        content, changes = content[:13] + b"\0", [*changes, f"{name} IPR"]
    return (whole, []) if not changes else (_box_of(child.kind, content[:size]), changes)


def _resolution(data: bytes, child: _Child) -> tuple[bytes, list[str]]:
    """The Resolution superbox holds a capture and a display resolution, one of each at most, 10 bytes of numbers each
    (T.800 I.5.3.7: vertical and horizontal numerators and denominators, each 1 to 65535, and exponents): any other
    child, and bytes past those 10, go; so does a resolution out of those bounds (a zero denominator would have a
    reader divide by zero), shorter than its fields, or a second one; and the box, where none is left. No decoder reads
    it for the samples."""
    inner = _children(data, child.content, child.end, "the Resolution box")
    kept, changes = {}, []
    for box in inner:
        fields = data[box.content : box.content + 10]
        if box.kind not in (b"resc", b"resd"):
            changes.append("JP2 res excess")
        elif box.kind in kept or len(fields) < 10 or 0 in struct.unpack_from(">4H", fields):
            changes.append("JP2 res inconsistent")
        else:
            kept[box.kind] = _box_of(box.kind, fields)
            changes += ["JP2 res excess"] if box.end - box.content > 10 else []
    if not kept:
        return b"", ["JP2 res inconsistent"]
    if not changes:
        return data[child.start : child.end], []
    return _box_of(b"res ", b"".join(kept.values())), list(dict.fromkeys(changes))


def _colour(content: bytes, channels: int) -> tuple[bytes, str] | None:
    """A colour box as one with an enumerated colour space (T.800 I.5.3.3: method, precedence, approximation, then the
    4-byte space), and what it lost; None where it is one already. Bytes after the space go (a CIELab's optional
    parameters among them: their defaults stand in). An ICC profile (method 2, or JPX's 3) is replaced by greyscale or
    sRGB, by the channels the image decodes to: its description, copyright, device and private tags are free text, and
    no decoder the pool uses applies it (OpenJPEG hands it on; DICOM's colour is the data set's Photometric
    Interpretation and ICC Profile), so the samples decode the same. Any other method (JPX's vendor and parameterised
    ones) likewise, and an enumerated space JP2 and JPX do not define or an approximation past JPX's 4: four bytes of
    a space no reader knows can spell anything."""
    method = content[0] if content else 0
    if method == _ENUMERATED and len(content) >= 7:
        known = struct.unpack_from(">L", content, 3)[0] in _ENUMERATED_SPACES and content[2] <= _MAX_APPROXIMATION
        if known:
            return None if len(content) == 7 else (_box_of(b"colr", content[:7]), "JP2 colr excess")
    space = _GREYSCALE if channels < 3 else _SRGB
    replaced = _box_of(b"colr", struct.pack(">BBBL", _ENUMERATED, 0, 0, space))
    if method == _ENUMERATED and len(content) >= 7:
        return replaced, "JP2 colr inconsistent"
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
