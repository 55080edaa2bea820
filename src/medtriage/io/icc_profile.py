"""An ICC profile (ICC.1:2010, profile versions 2 and 4) rebuilt from its colour data alone, for ICC Profile (0028,2000).

A profile holds free text beside the transform a colour-managed viewer applies: its description (`desc`) and copyright
(`cprt`), the device manufacturer's and model's descriptions (`dmnd`, `dmdd`), viewing conditions, a calibration date
(`calt`), a profile sequence naming other devices (`pseq`), named colours, and any private or unknown tag; its 128-byte
header names the device's manufacturer and model, the creator, the creation date and time, and has an MD5 profile ID. Any
of them can name a site, a scanner or a patient, and bytes no reader looks at (padding between tags, bytes past a tag's
data, reserved fields) can hold anything.

`cleaned_profile` keeps the tags a colour transform is made of, by signature and by type, each rebuilt from the fields
its type declares (reserved fields zeroed, bytes past its data and between its parts left behind):

- white and black point, red, green and blue colorants (`wtpt`, `bkpt`, `rXYZ`, `gXYZ`, `bXYZ`): one XYZNumber each;
- tone reproduction curves (`rTRC`, `gTRC`, `bTRC`, `kTRC`): `curv` or `para`;
- chromatic adaptation (`chad`): `sf32`, a 3x3 matrix;
- the LUT-based transforms (`A2B0`-`A2B2`, `B2A0`-`B2A2`, `gamt`): `mft1`, `mft2`, and `mAB ` / `mBA ` with their
  curves, matrix and colour lookup table each rebuilt and laid out again, with new offsets.

Everything else goes, the float transforms (`D2Bx`, `B2Dx`, type `mpet`) too: a reader then uses the `A2Bx` / `B2Ax` or
matrix/TRC transform the profile has beside them. The description and copyright become fixed text (`textDescriptionType`
and `textType` in a version 2 profile, `multiLocalizedUnicodeType` in version 4), and the header keeps the version,
class, colour spaces, flags 0-1 and the rendering intent; the creation date becomes one fixed date (`CREATED`); the
preferred CMM, platform, device manufacturer, model and attributes, creator, profile ID and reserved bytes are zero;
the PCS illuminant is D50 (the only value ICC.1 allows). The size and the tag table are written anew, tags shared in the original (one curve for three
channels) shared again.

The values themselves are kept as they are: a curve or a lookup table is numbers a writer could choose to spell
something with, but they are the colour a viewer applies, and no rule can tell a planted number from a measured one.

The profile is untrusted input: every count, offset and size it claims is checked against the bytes there are before
anything is read or built, and what is built is bounded by the profile's own size (tags pointing at the same bytes are
rebuilt once). A profile that cannot be read that way, or that keeps no transform, is None: `deid` removes it.

The standard library only, as the rest of the de-identification.
"""

from __future__ import annotations

import struct

DESCRIPTION = "de-identified"  # the profile description (`desc`) a cleaned profile has
COPYRIGHT = "de-identified"  # and its copyright (`cprt`)
CREATED = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)  # the creation date and time every cleaned profile has

_HEADER_SIZE = 128
_TABLE_START = _HEADER_SIZE + 4  # the tag count, then 12 bytes a tag: signature, offset, size
_TAG_ENTRY = 12
_VERSIONS = (2, 4)  # major versions: ICC.1:2001-04 and earlier, ICC.1:2004-10 and ICC.1:2010 (iccMAX's 5 is another format)
# Profile classes that describe a device or a colour space (DICOM asks for an input profile, `scnr`; sRGB profiles are
# often `mntr`); device links, abstract and named colour profiles (colour names are text) are no image's colour.
_CLASSES = frozenset({b"scnr", b"mntr", b"prtr", b"spac"})
_COLOUR_SPACES = frozenset(
    {b"XYZ ", b"Lab ", b"Luv ", b"YCbr", b"Yxy ", b"RGB ", b"GRAY", b"HSV ", b"HLS ", b"CMYK", b"CMY "}
    | {b"%XCLR" % n for n in range(2, 16)}
)
_PCS = frozenset({b"XYZ ", b"Lab "})
_D50 = struct.pack(">3i", 0xF6D6, 0x10000, 0xD32D)  # the PCS illuminant, as ICC.1 7.2.16 requires it
_KNOWN_FLAGS = 0x3  # embedded, cannot be used independently; bits 2-15 are reserved, 16-31 the CMM's own
_INTENTS = range(4)
_MAX_CHANNELS = 15  # ICC.1 10.8-10.11: a LUT has at most 15 input and output channels
_PARA_PARAMETERS = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}  # parametricCurveType: parameters of each function type
_AB_HEADER = 32  # lutAToBType / lutBToAType: type, reserved, channels, padding, five offsets
_SLACK = 4096  # what a cleaned profile may grow by beside twice its size: new text tags, alignment


class _Malformed(Exception):
    """The profile cannot be read within its bounds."""


def cleaned_profile(data: bytes) -> bytes | None:
    """The profile rebuilt from its colour transform, with no text, dates, device names or unread bytes; None where
    `data` is not a version 2 or 4 ICC profile that can be read within its size, or keeps no transform."""
    try:
        return _rebuilt(bytes(data))
    except _Malformed:
        return None


class _Budget:
    """How many bytes the rebuilt tags may still take: a profile whose parts all point at the same bytes must not
    grow into many times its size."""

    def __init__(self, limit: int):
        self.left = limit

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise _Malformed("the rebuilt profile would be larger than the profile")


def _rebuilt(data: bytes) -> bytes:
    if len(data) < _TABLE_START:
        raise _Malformed("shorter than a header and a tag count")
    size = _u32(data, 0)
    if not _TABLE_START <= size <= len(data):  # a DICOM value may have one pad byte more
        raise _Malformed(f"a declared size of {size} bytes in {len(data)}")
    profile = data[:size]
    major = profile[8]
    if major not in _VERSIONS or profile[36:40] != b"acsp":
        raise _Malformed("not a version 2 or 4 ICC profile")
    kind, space, pcs = profile[12:16], profile[16:20], profile[20:24]
    if kind not in _CLASSES or space not in _COLOUR_SPACES or pcs not in _PCS:
        raise _Malformed("a profile class or colour space that is no image's colour")
    count = _u32(profile, _HEADER_SIZE)
    table_end = _TABLE_START + _TAG_ENTRY * count  # Python's integers: no overflow to wrap around
    if table_end > size:
        raise _Malformed(f"{count} tags in a table past the profile's end")
    budget = _Budget(2 * size + _SLACK)
    kept: dict[bytes, bytes] = {}
    built: dict[tuple[int, int], bytes | None] = {}  # (offset, size) -> rebuilt: shared data is rebuilt once
    for entry in range(_TABLE_START, table_end, _TAG_ENTRY):
        signature, offset, length = struct.unpack_from(">4sII", profile, entry)
        types = _KEPT_TAGS.get(signature)
        if types is None or signature in kept:
            continue  # text, a tag no transform needs, a private or unknown one; or a second one, which readers ignore
        if offset < table_end or offset + length > size:
            raise _Malformed(f"tag {signature!r} at {offset}+{length} outside the profile's tag data")
        if (offset, length) not in built:
            tag = profile[offset : offset + length]
            built[(offset, length)] = _BUILDERS[tag[:4]](tag, budget) if tag[:4] in types else None
        if built[(offset, length)] is not None:
            kept[signature] = built[(offset, length)]
    if not _has_transform(kept):
        raise _Malformed("no colour transform left")
    return _assembled(profile, _text_tags(major) | kept)


def _has_transform(kept: dict[bytes, bytes]) -> bool:
    return bool(kept.keys() & _LUT_TAGS) or _MATRIX_TRC <= kept.keys() or b"kTRC" in kept


def _assembled(profile: bytes, tags: dict[bytes, bytes]) -> bytes:
    """A header with only the fields a transform reads, the tag table, and the tags' data: each on a 4-byte boundary,
    zeros between them, one copy of equal data."""
    header = bytearray(_HEADER_SIZE)
    header[8:10] = profile[8:10]  # major version; minor and bug fix version (10-11 are reserved)
    header[12:24] = profile[12:24]  # class, colour space, PCS
    header[24:36] = CREATED  # a valid dateTimeNumber (a zero month or day is none, and readers refuse it), the same for all
    header[36:40] = b"acsp"
    flags = _u32(profile, 44) & _KNOWN_FLAGS
    struct.pack_into(">I", header, 44, flags if flags & 1 else 0)  # bit 1 says something of an embedded profile only
    intent = _u32(profile, 64)
    struct.pack_into(">I", header, 64, intent if intent in _INTENTS else 0)
    header[68:80] = _D50
    table = bytearray(struct.pack(">I", len(tags)))
    body = bytearray()
    data_start = _TABLE_START + _TAG_ENTRY * len(tags)
    placed: dict[bytes, int] = {}
    for signature, data in tags.items():
        if data not in placed:
            placed[data] = data_start + len(body)
            body += _aligned(data)
        table += struct.pack(">4sII", signature, placed[data], len(data))
    struct.pack_into(">I", header, 0, data_start + len(body))
    return bytes(header + table + body)


# ---------------------------------------------------------------- tag types


def _xyz(tag: bytes, budget: _Budget) -> bytes:
    """XYZType: one XYZNumber, what every tag kept with this type holds (more are room for anything)."""
    _need(tag, 20)
    budget.take(20)
    return b"XYZ " + bytes(4) + tag[8:20]


def _adaptation(tag: bytes, budget: _Budget) -> bytes:
    """s15Fixed16ArrayType as the chromatic adaptation tag has it: a 3x3 matrix."""
    _need(tag, 44)
    budget.take(44)
    return b"sf32" + bytes(4) + tag[8:44]


def _single_curve(tag: bytes, budget: _Budget) -> bytes:
    return _curve(tag, 0, budget)[0]


def _curve(tag: bytes, at: int, budget: _Budget) -> tuple[bytes, int]:
    """The curveType or parametricCurveType at `at`, rebuilt, and where its data ends."""
    kind = tag[at : at + 4]
    if kind == b"curv":
        end = at + 12 + 2 * _u32(tag, at + 8)
        _need(tag, end)
        budget.take(end - at)
        return b"curv" + bytes(4) + tag[at + 8 : end], end
    if kind == b"para":
        parameters = _PARA_PARAMETERS.get(_u16(tag, at + 8))
        if parameters is None:
            raise _Malformed("a parametric curve of an unknown function type")
        end = at + 12 + 4 * parameters
        _need(tag, end)
        budget.take(end - at)
        return b"para" + bytes(4) + tag[at + 8 : at + 10] + bytes(2) + tag[at + 12 : end], end
    raise _Malformed(f"a curve of type {kind!r}")


def _channels(tag: bytes) -> tuple[int, int]:
    inputs, outputs = tag[8], tag[9]
    if not (1 <= inputs <= _MAX_CHANNELS and 1 <= outputs <= _MAX_CHANNELS):
        raise _Malformed(f"a LUT of {inputs} input and {outputs} output channels")
    return inputs, outputs


def _lut(tag: bytes, budget: _Budget) -> bytes:
    """lut8Type (`mft1`) and lut16Type (`mft2`): matrix, input tables, colour lookup table, output tables."""
    _need(tag, 52 if tag[:4] == b"mft2" else 48)
    inputs, outputs = _channels(tag)
    grid = tag[10]
    if grid < 2:
        raise _Malformed(f"a colour lookup table of {grid} grid points")
    clut = grid**inputs * outputs  # at most 255 ** 15 * 15: compared with the tag's size before anything is read
    if tag[:4] == b"mft1":
        end = 48 + 256 * inputs + clut + 256 * outputs
        tables = tag[12:48]
    else:
        entries_in, entries_out = _u16(tag, 48), _u16(tag, 50)
        if not (2 <= entries_in <= 4096 and 2 <= entries_out <= 4096):
            raise _Malformed(f"lut16 tables of {entries_in} and {entries_out} entries")
        end = 52 + 2 * (entries_in * inputs + clut + entries_out * outputs)
        tables = tag[12:52]
    _need(tag, end)
    budget.take(end)
    return tag[:4] + bytes(4) + bytes((inputs, outputs, grid, 0)) + tables + tag[len(tables) + 12 : end]


def _lut_ab(tag: bytes, budget: _Budget) -> bytes:
    """lutAToBType (`mAB `) and lutBToAType (`mBA `): the B curves, a matrix, the M curves, a colour lookup table and the
    A curves, each where its offset points, laid out again one after another (4-byte aligned, zeros between)."""
    _need(tag, _AB_HEADER)
    inputs, outputs = _channels(tag)
    to_pcs = tag[:4] == b"mAB "
    b_and_m, a = (outputs, inputs) if to_pcs else (inputs, outputs)  # how many B / M curves, and A curves
    b_at, matrix_at, m_at, clut_at, a_at = struct.unpack_from(">5I", tag, 12)
    if not b_at:
        raise _Malformed("a LUT without its B curves")
    if (matrix_at or m_at) and b_and_m != 3:
        raise _Malformed("a matrix for other than three channels")
    if not clut_at and inputs != outputs:
        raise _Malformed("a LUT that changes its channel count without a colour lookup table")
    budget.take(_AB_HEADER)
    parts = [
        _curves(tag, b_at, b_and_m, budget),
        _matrix(tag, matrix_at, budget) if matrix_at else b"",
        _curves(tag, m_at, b_and_m, budget) if m_at else b"",
        _clut(tag, clut_at, inputs, outputs, budget) if clut_at else b"",
        _curves(tag, a_at, a, budget) if a_at else b"",
    ]
    offsets, at = [], _AB_HEADER
    for part in parts:
        offsets.append(at if part else 0)
        at += len(part)
    head = tag[:4] + bytes(4) + bytes((inputs, outputs, 0, 0)) + struct.pack(">5I", *offsets)
    return head + b"".join(parts)


def _at(tag: bytes, offset: int) -> int:
    if offset < _AB_HEADER or offset >= len(tag):
        raise _Malformed(f"a LUT part at {offset} outside its tag of {len(tag)} bytes")
    return offset


def _curves(tag: bytes, offset: int, count: int, budget: _Budget) -> bytes:
    """`count` curves one after another, each on a 4-byte boundary (ICC.1 10.10): rebuilt, with zero padding."""
    at, out = _at(tag, offset), []
    for _ in range(count):
        curve, end = _curve(tag, at, budget)
        out.append(_aligned(curve))
        at = end + (-end) % 4
    return b"".join(out)


def _matrix(tag: bytes, offset: int, budget: _Budget) -> bytes:
    """Twelve s15Fixed16Numbers: a 3x3 matrix and three offsets."""
    at = _at(tag, offset)
    _need(tag, at + 48)
    budget.take(48)
    return tag[at : at + 48]


def _clut(tag: bytes, offset: int, inputs: int, outputs: int, budget: _Budget) -> bytes:
    """A colour lookup table: grid points of each input channel (16 bytes, the unused ones zero), precision (1 or 2
    bytes), three reserved bytes, then the table."""
    at = _at(tag, offset)
    _need(tag, at + 20)
    grid = tag[at : at + inputs]
    precision = tag[at + 16]
    if min(grid) < 2 or precision not in (1, 2):
        raise _Malformed("a colour lookup table of fewer than two grid points or an unknown precision")
    size = outputs * precision
    for points in grid:
        size *= points
    end = at + 20 + size
    _need(tag, end)
    budget.take(20 + size + 3)
    return _aligned(grid + bytes(16 - inputs) + bytes((precision, 0, 0, 0)) + tag[at + 20 : end])


_MATRIX_TRC = frozenset({b"rXYZ", b"gXYZ", b"bXYZ", b"rTRC", b"gTRC", b"bTRC"})
_LUT_TAGS = frozenset({b"A2B0", b"A2B1", b"A2B2", b"B2A0", b"B2A1", b"B2A2"})
_BUILDERS = {
    b"XYZ ": _xyz,
    b"sf32": _adaptation,
    b"curv": _single_curve,
    b"para": _single_curve,
    b"mft1": _lut,
    b"mft2": _lut,
    b"mAB ": _lut_ab,
    b"mBA ": _lut_ab,
}
# The tags kept, and the types each may have: numbers a transform is made of, and nothing else.
_KEPT_TAGS = {
    **dict.fromkeys((b"wtpt", b"bkpt", b"rXYZ", b"gXYZ", b"bXYZ"), (b"XYZ ",)),
    **dict.fromkeys((b"rTRC", b"gTRC", b"bTRC", b"kTRC"), (b"curv", b"para")),
    b"chad": (b"sf32",),
    **dict.fromkeys((b"A2B0", b"A2B1", b"A2B2"), (b"mft1", b"mft2", b"mAB ")),
    **dict.fromkeys((b"B2A0", b"B2A1", b"B2A2", b"gamt"), (b"mft1", b"mft2", b"mBA ")),
}


# ---------------------------------------------------------------- fixed text


def _text_tags(major: int) -> dict[bytes, bytes]:
    """The description and copyright every profile must have, in the types its version allows."""
    if major >= 4:
        return {b"desc": _mluc(DESCRIPTION), b"cprt": _mluc(COPYRIGHT)}
    return {b"desc": _description(DESCRIPTION), b"cprt": b"text" + bytes(4) + COPYRIGHT.encode("ascii") + b"\0"}


def _mluc(text: str) -> bytes:
    """multiLocalizedUnicodeType with one record, en-US, in UTF-16BE."""
    encoded = text.encode("utf-16-be")
    return b"mluc" + bytes(4) + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(encoded), 28) + encoded


def _description(text: str) -> bytes:
    """textDescriptionType (ICC.1:2001-04 6.5.17): the ASCII text, no Unicode and no ScriptCode text (67 zero bytes)."""
    ascii_text = text.encode("ascii") + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)


# ---------------------------------------------------------------- bounded reads


def _need(data: bytes, end: int) -> None:
    if end > len(data):
        raise _Malformed(f"{end} bytes needed in {len(data)}")


def _u16(data: bytes, at: int) -> int:
    _need(data, at + 2)
    return int.from_bytes(data[at : at + 2], "big")


def _u32(data: bytes, at: int) -> int:
    _need(data, at + 4)
    return int.from_bytes(data[at : at + 4], "big")


def _aligned(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)
