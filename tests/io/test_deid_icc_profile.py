"""ICC Profile (0028,2000) in a de-identified object, at the top level and in an Optical Path Sequence item (a whole-slide
image's, Type 1C for colour). Before, the profile was kept whole: a name in its description, its copyright, a device
description, a private tag, its header (device, creator, date, profile ID, reserved bytes) or between its tags reached
the pool. Now it is rebuilt from its colour transform alone (`medtriage.io.icc_profile`), and removed where it cannot be
read within its bounds.

Real profiles: the HP sRGB profile (version 2.1) of pydicom's colour palette files, the Apple profile (2.2) in the JP2
colour box of pydicom's GDCM JPEG 2000 file, and littlecms's sRGB (4.4) that Pillow writes; and hand-built ones with
every LUT type (lut8, lut16, lutAToB and lutBToA with curves, matrix and colour lookup table). littlecms (Pillow's
ImageCms) must load each cleaned profile and convert colours exactly as from the original.
"""

from __future__ import annotations

import io
import itertools
import struct

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms
from pydicom.data import get_palette_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ImplicitVRLittleEndian

from medtriage.io.deid import deidentify
from medtriage.io.icc_profile import COPYRIGHT, CREATED, DESCRIPTION, cleaned_profile
from medtriage.io.site_key import SiteKey
from tests.io.test_deid_edges import _reread

KEY = SiteKey(b"icc-profile-secret-0123456789abcdef")
NAME = b"DOE^JANE^MRN4711"
CHUNKS = [NAME[i : i + 4] for i in range(0, len(NAME), 4)]  # what a 4-byte header field can hold of it
TEXT_TAGS = (b"desc", b"cprt", b"dmnd", b"dmdd", b"vued", b"dscm")
D50 = struct.pack(">3i", 0xF6D6, 0x10000, 0xD32D)
PIXELS = bytes([0, 0, 0, 255, 255, 255, 200, 30, 60, 10, 200, 90, 128, 128, 128, 30, 60, 250, 250, 180, 20, 64, 0, 128])
SRGB = ImageCms.createProfile("sRGB")
TARGETS = ((SRGB, "RGB"), (ImageCms.createProfile("LAB"), "LAB"))


# ---------------------------------------------------------------- profiles


def _palette_profile() -> bytes:
    """The HP sRGB profile (v2.1: desc, dmnd, dmdd, vued, view, meas, tech, one curve shared by three TRC tags)."""
    return pydicom.dcmread(get_palette_files("hotiron.dcm")[0]).ICCProfile


def _apple_profile() -> bytes:
    """Apple's 'Generic GBR Profile' (v2.2, with a dscm description) in the colour box of GDCM's JP2 file."""
    ds = pydicom.dcmread(get_testdata_file("GDCMJ2K_TextGBR.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    at = frame.index(b"colr") - 4
    box = frame[at : at + struct.unpack_from(">I", frame, at)[0]]
    return box[11:]  # length, 'colr', method 2, precedence, approximation


def _lcms_profile() -> bytes:
    """littlecms's sRGB (v4.4: mluc texts, chad, parametric curves, chrm)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _tag_list(profile: bytes) -> list[tuple[bytes, bytes]]:
    count = struct.unpack_from(">I", profile, 128)[0]
    entries = [struct.unpack_from(">4sII", profile, 132 + 12 * k) for k in range(count)]
    return [(signature, profile[offset : offset + size]) for signature, offset, size in entries]


def _tags(profile: bytes) -> dict[bytes, bytes]:
    return dict(_tag_list(profile))


def _profile(header: bytes, tags: list[tuple[bytes, bytes]], gap: bytes = b"", tail: bytes = b"") -> bytes:
    """A profile of `header` and `tags`, equal data shared, `gap` after each tag's data, `tail` after the last."""
    table_end = 132 + 12 * len(tags)
    table, body, placed = bytearray(struct.pack(">I", len(tags))), bytearray(), {}
    for signature, data in tags:
        if data not in placed:
            placed[data] = table_end + len(body)
            body += data + gap
            body += bytes(-len(body) % 4)
        table += struct.pack(">4sII", signature, placed[data], len(data))
    body += tail
    return struct.pack(">I", table_end + len(body)) + header[4:128] + bytes(table) + bytes(body)


def _mluc(text: bytes) -> bytes:
    encoded = text.decode("ascii").encode("utf-16-be")
    return b"mluc" + bytes(4) + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(encoded), 28) + encoded


def _v2_description(text: bytes) -> bytes:
    """textDescriptionType with the text in all three parts: ASCII, Unicode and the Macintosh ScriptCode string."""
    unicode = text.decode("ascii").encode("utf-16-be") + b"\0\0"
    script = bytes([len(text)]) + text.ljust(67, b"\0")
    return (
        b"desc"
        + bytes(4)
        + struct.pack(">I", len(text) + 1)
        + text
        + b"\0"
        + struct.pack(">II", 0, len(text) + 1)
        + unicode
        + b"\0\0"
        + script
    )


def _planted_header(header: bytes) -> bytes:
    planted = bytearray(header)
    planted[4:8] = CHUNKS[0]  # preferred CMM
    planted[10:12] = CHUNKS[1][:2]  # the version's reserved bytes
    planted[24:36] = struct.pack(">6H", 2024, 3, 14, 15, 9, 26)  # creation date and time
    planted[40:44] = CHUNKS[1]  # primary platform
    planted[44:48] = CHUNKS[2]  # flags: reserved bits and the CMM's
    planted[48:52] = CHUNKS[3]  # device manufacturer
    planted[52:56] = CHUNKS[0]  # device model
    planted[56:64] = CHUNKS[1] + CHUNKS[2]  # device attributes
    planted[64:68] = CHUNKS[1]  # rendering intent, out of range
    planted[80:84] = CHUNKS[3]  # creator
    planted[84:100] = NAME  # profile ID
    planted[100:128] = (NAME + NAME)[:28]  # reserved
    return bytes(planted)


def _planted(profile: bytes) -> bytes:
    """`profile` with the name in every text tag, in a private text tag, in a private tag of a numeric type, in an
    unkept tag of signature type, in each numeric tag's reserved field and past its data, between the tags, after them,
    and in the header."""
    v4 = profile[8] >= 4
    tags = []
    for signature, data in _tag_list(profile):
        if signature in TEXT_TAGS and (v4 or signature == b"dscm"):
            data = _mluc(NAME)
        elif signature == b"cprt":
            data = b"text" + bytes(4) + NAME + b"\0"
        elif signature in TEXT_TAGS:
            data = _v2_description(NAME)
        elif data[:4] in (b"XYZ ", b"curv", b"para", b"sf32"):
            data = data[:4] + CHUNKS[1] + data[8:] + NAME
        tags.append((signature, data))
    present = {signature for signature, _ in tags}
    tags += [(s, _mluc(NAME) if v4 else _v2_description(NAME)) for s in (b"dmnd", b"dmdd") if s not in present]
    tags += [
        (b"ZPRV", b"text" + bytes(4) + NAME + b"\0"),  # a private tag
        (b"ZCRV", b"curv" + bytes(4) + struct.pack(">I", len(NAME) // 2) + NAME),  # private, in a numeric type
        (b"targ", b"text" + bytes(4) + NAME + b"\0"),  # characterisation target
    ]
    if b"tech" not in present:
        tags.append((b"tech", b"sig " + bytes(4) + CHUNKS[0]))
    return _profile(_planted_header(profile[:128]), tags, gap=NAME, tail=NAME)


# ---------------------------------------------------------------- hand-built LUT profiles


def _s15(*values: float) -> bytes:
    return struct.pack(f">{len(values)}i", *(round(v * 65536) for v in values))


MATRIX = _s15(0.9, 0.05, 0.05, 0.1, 0.8, 0.1, 0.02, 0.08, 0.9)


def _grid_values(grid: int, scale: int) -> list[int]:
    """A colour lookup table of three inputs and three outputs: a mix of the inputs, no identity."""
    values = []
    for r, g, b in itertools.product(range(grid), repeat=3):
        r, g, b = (v / (grid - 1) for v in (r, g, b))
        values += [round(scale * min(1.0, max(0.0, x))) for x in (0.5 * r + 0.4 * g + 0.1 * b, 0.5 + 0.4 * (r - g), 0.5 + 0.4 * (g - b))]
    return values


def _ramp(entries: int, scale: int, gamma: float) -> list[int]:
    return [round(scale * (k / (entries - 1)) ** gamma) for k in range(entries)]


def _mft1() -> bytes:
    tables_in = _ramp(256, 255, 1.1) * 3
    clut, tables_out = _grid_values(5, 255), _ramp(256, 255, 0.9) * 3
    return b"mft1" + CHUNKS[1] + bytes((3, 3, 5)) + CHUNKS[2][:1] + MATRIX + bytes(tables_in + clut + tables_out) + NAME


def _mft2() -> bytes:
    tables_in, clut, tables_out = _ramp(33, 65535, 1.2) * 3, _grid_values(9, 65535), _ramp(17, 65535, 0.8) * 3
    words = tables_in + clut + tables_out
    return b"mft2" + CHUNKS[1] + bytes((3, 3, 9)) + CHUNKS[2][:1] + MATRIX + struct.pack(f">HH{len(words)}H", 33, 17, *words) + NAME


def _curv(entries: list[int]) -> bytes:
    return b"curv" + CHUNKS[3] + struct.pack(f">I{len(entries)}H", len(entries), *entries)


def _para(gamma: float) -> bytes:
    return b"para" + CHUNKS[0] + struct.pack(">H", 0) + CHUNKS[1][:2] + _s15(gamma)


def _curve_set(curves: list[bytes]) -> bytes:
    """Curves one after another, the padding to each 4-byte boundary holding part of the name."""
    out = b""
    for curve in curves:
        out += curve + NAME[: -len(curve) % 4]
    return out


def _lut_ab(kind: bytes) -> bytes:
    """lutAToBType / lutBToAType with every part: B curves, matrix, M curves, colour lookup table, A curves, with the name
    in the reserved fields, the unused grid points, the reserved bytes after the precision, between parts and after."""
    b_curves = _curve_set([_curv([]), _curv([0, 65535]), _curv([])])  # identity: no entries, or two
    m_curves = _curve_set([_para(1.0), _para(1.1), _para(0.9)])
    values = _grid_values(3, 65535)
    clut = bytes((3, 3, 3)) + NAME[:13] + bytes((2,)) + CHUNKS[0][:3] + struct.pack(f">{len(values)}H", *values)
    a_curves = _curve_set([_curv(_ramp(5, 65535, 1.3)), _curv(_ramp(7, 65535, 0.7)), _para(2.2)])
    parts = [b_curves, MATRIX + _s15(0.01, 0.0, -0.01), m_curves, clut, a_curves]
    offsets, body = [], b""
    for part in parts:
        body += NAME  # between the parts
        offsets.append(32 + len(body))
        body += part + bytes(-len(part) % 4)
    return kind + CHUNKS[0] + bytes((3, 3)) + CHUNKS[1][:2] + struct.pack(">5I", *offsets) + body + NAME


def _lut_profile(a2b: bytes, b2a: bytes, version: int) -> bytes:
    """An input (scanner) profile, RGB to Lab, whose transforms are `a2b` and `b2a`, planted as `_planted` does."""
    header = bytearray(_lcms_profile()[:128])
    header[8:12] = bytes((version, 0x40 if version == 2 else 0x30, 0, 0))
    header[12:24] = b"scnrRGB Lab "
    text = _mluc(NAME) if version >= 4 else _v2_description(NAME)
    cprt = _mluc(NAME) if version >= 4 else b"text" + bytes(4) + NAME + b"\0"
    tags = [(b"desc", text), (b"cprt", cprt), (b"wtpt", b"XYZ " + bytes(4) + D50), (b"A2B0", a2b), (b"B2A0", b2a)]
    tags += [(b"dmnd", text), (b"ZPRV", b"text" + bytes(4) + NAME + b"\0")]
    return _profile(_planted_header(bytes(header)), tags, gap=NAME, tail=NAME)


REAL = {"hp-srgb-v2.1": _palette_profile, "apple-v2.2": _apple_profile, "lcms-srgb-v4.4": _lcms_profile}
BUILT = {
    "lut8-v2": lambda: _lut_profile(_mft1(), _mft1(), 2),
    "lut16-v2": lambda: _lut_profile(_mft2(), _mft2(), 2),
    "lutAB-v4": lambda: _lut_profile(_lut_ab(b"mAB "), _lut_ab(b"mBA "), 4),
}


# ---------------------------------------------------------------- checks


def _converted(profile: bytes) -> list[bytes]:
    """A few colours through littlecms: from the profile to sRGB and to Lab, and from sRGB into the profile (its B2A)."""
    loaded = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    image = Image.frombytes("RGB", (len(PIXELS) // 3, 1), PIXELS)
    out = [ImageCms.applyTransform(image, ImageCms.buildTransform(loaded, target, "RGB", mode)).tobytes() for target, mode in TARGETS]
    if b"B2A0" in _tags(profile):
        out.append(ImageCms.applyTransform(image, ImageCms.buildTransform(SRGB, loaded, "RGB", "RGB")).tobytes())
    return out


def _leaks(data: bytes) -> list[bytes]:
    found = []
    for chunk in CHUNKS:
        text = chunk.decode("ascii")
        found += [form for form in (chunk, text.encode("utf-16-be"), text.encode("utf-16-le")) if form in data]
    return found


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _assert_clean(cleaned: bytes, original: bytes) -> None:
    assert not _leaks(cleaned), _leaks(cleaned)
    assert len(cleaned) % 4 == 0 and struct.unpack_from(">I", cleaned)[0] == len(cleaned)
    header = cleaned[:128]
    assert header[8:10] == original[8:10] and header[12:24] == original[12:24] and header[36:40] == b"acsp"
    for start, end in ((4, 8), (10, 12), (40, 44), (48, 64), (80, 128)):
        assert header[start:end] == bytes(end - start), (start, end)  # CMM, platform, device, creator, ID, reserved
    assert header[24:36] == CREATED  # one date for every profile: readers refuse a zero month or day
    assert struct.unpack_from(">I", header, 44)[0] & ~0x3 == 0 and struct.unpack_from(">I", header, 64)[0] <= 3
    assert header[68:80] == D50
    kept = _tags(cleaned)
    assert set(kept) == {b"desc", b"cprt"} | {s for s in _tags(original) if s in COLOUR_TAGS}
    loaded = ImageCms.ImageCmsProfile(io.BytesIO(cleaned)).profile
    assert loaded.profile_description == DESCRIPTION and loaded.copyright == COPYRIGHT
    assert loaded.creation_date.year == 2000  # littlecms reads the date (it raised on the zero one)
    assert _converted(cleaned) == _converted(original)
    assert cleaned_profile(cleaned) == cleaned  # nothing left to clean


COLOUR_TAGS = {
    *(b"wtpt", b"bkpt", b"rXYZ", b"gXYZ", b"bXYZ", b"rTRC", b"gTRC", b"bTRC", b"kTRC", b"chad"),
    *(b"A2B0", b"A2B1", b"A2B2", b"B2A0", b"B2A1", b"B2A2", b"gamt"),
}


# ---------------------------------------------------------------- the profile alone


@pytest.mark.parametrize("make", [*REAL.values(), *BUILT.values()], ids=[*REAL, *BUILT])
def test_a_planted_profile_is_rebuilt_from_its_colour_tags_and_converts_the_same(make):
    original = make()
    planted = _planted(original) if make in REAL.values() else original
    if make in REAL.values():
        assert _converted(planted) == _converted(original)  # littlecms reads past all that was planted
        assert _leaks(planted)
    cleaned = cleaned_profile(planted)
    assert cleaned is not None
    _assert_clean(cleaned, planted)
    assert _converted(cleaned) == _converted(original)


@pytest.mark.parametrize("make", REAL.values(), ids=list(REAL))
def test_real_profiles_keep_their_transform_and_shared_curves(make):
    original = make()
    cleaned = cleaned_profile(original)
    assert _converted(cleaned) == _converted(original) and len(cleaned) <= len(original)
    table = {s: struct.unpack_from(">I", cleaned, 132 + 12 * k + 4)[0] for k, (s, _) in enumerate(_tag_list(cleaned))}
    originals = {s: struct.unpack_from(">I", original, 132 + 12 * k + 4)[0] for k, (s, _) in enumerate(_tag_list(original))}
    if originals.get(b"rTRC") == originals.get(b"gTRC") == originals.get(b"bTRC"):
        assert table[b"rTRC"] == table[b"gTRC"] == table[b"bTRC"]  # one curve for three channels, as before


def test_the_version_decides_the_text_types():
    v2, v4 = cleaned_profile(_palette_profile()), cleaned_profile(_lcms_profile())
    assert _tags(v2)[b"desc"][:4] == b"desc" and _tags(v2)[b"cprt"][:4] == b"text"
    assert _tags(v4)[b"desc"][:4] == b"mluc" and _tags(v4)[b"cprt"][:4] == b"mluc"


def _with_u32(profile: bytes, at: int, value: int) -> bytes:
    return profile[:at] + struct.pack(">I", value) + profile[at + 4 :]


def _tag_offset(profile: bytes, signature: bytes) -> tuple[int, int]:
    """Where the tag table entry of `signature` is, and where its data starts."""
    for k, (s, _) in enumerate(_tag_list(profile)):
        if s == signature:
            return 132 + 12 * k, struct.unpack_from(">I", profile, 132 + 12 * k + 4)[0]
    raise KeyError(signature)


def _malformed() -> dict[str, bytes]:
    v4, lut = _lcms_profile(), BUILT["lutAB-v4"]()
    entry, trc = _tag_offset(v4, b"rTRC")
    _, a2b = _tag_offset(lut, b"A2B0")
    lut_entry, _ = _tag_offset(lut, b"A2B0")
    only_text = _profile(v4[:128], [(b"desc", _mluc(b"x")), (b"cprt", _mluc(b"x")), (b"ZPRV", _curv([1, 2]))])
    return {
        "empty": b"",
        "header-only": v4[:128],
        "truncated": v4[: len(v4) // 2],
        "size-past-the-data": _with_u32(v4, 0, len(v4) + 4),
        "size-below-the-table": _with_u32(v4, 0, 100),
        "not-acsp": v4[:36] + b"xxxx" + v4[40:],
        "iccmax-v5": v4[:8] + b"\x05" + v4[9:],
        "device-link": v4[:12] + b"link" + v4[16:],
        "named-colour": v4[:12] + b"nmcl" + v4[16:],
        "pcs-rgb": v4[:20] + b"RGB " + v4[24:],
        "tag-count-huge": _with_u32(v4, 128, 0xFFFFFFFF),
        "tag-offset-past-the-end": _with_u32(v4, entry + 4, len(v4) - 8),
        "tag-size-past-the-end": _with_u32(v4, entry + 8, 0xFFFFFFF0),
        "tag-in-the-table": _with_u32(v4, entry + 4, 132),
        "para-unknown-function": v4[: trc + 8] + b"\x00\x09" + v4[trc + 10 :],
        "curv-count-huge": v4[:trc] + b"curv" + v4[trc + 4 : trc + 8] + b"\xff\xff\xff\xff" + v4[trc + 12 :],
        "lut-b-curves-outside": _with_u32(lut, a2b + 12, 0x7FFFFFFF),
        "lut-part-in-its-header": _with_u32(lut, a2b + 24, 8),
        "lut-no-b-curves": _with_u32(lut, a2b + 12, 0),
        "lut-channels-zero": lut[: a2b + 8] + b"\x00" + lut[a2b + 9 :],
        "lut-channels-sixteen": lut[: a2b + 8] + b"\x10\x10" + lut[a2b + 10 :],
        "lut-tag-cut": _with_u32(lut, lut_entry + 8, 40),
        "no-transform-left": only_text,
    }


@pytest.mark.parametrize("name", list(_malformed()))
def test_a_profile_that_cannot_be_read_within_its_bounds_is_none(name):
    assert cleaned_profile(_malformed()[name]) is None


def test_a_profile_whose_parts_point_at_the_same_bytes_is_refused_not_built_many_times_over():
    """Three A2B tags pointing at one lutAToB's bytes (each a little shorter, so none is the same tag), whose B and A
    curves point at the same three big curves: read as it claims, it would be built six times. Refused instead."""
    curves = _curv(list(range(0, 60000, 3))) * 3
    lut = b"mAB " + bytes(4) + bytes((3, 3, 0, 0)) + struct.pack(">5I", 32, 0, 0, 0, 32) + curves + bytes(64)
    tags = [(b"desc", _mluc(b"x")), (b"cprt", _mluc(b"x")), (b"A2B0", lut), (b"A2B1", _mluc(b"1")), (b"A2B2", _mluc(b"2"))]
    hostile = base = _profile(_lcms_profile()[:128], tags)
    entry, offset = _tag_offset(base, b"A2B0")
    for k in (1, 2):  # A2B1 and A2B2 moved onto A2B0's bytes
        hostile = _with_u32(_with_u32(hostile, entry + 12 * k + 4, offset), entry + 12 * k + 8, len(lut) - 4 * k)
    assert cleaned_profile(base) is not None
    assert cleaned_profile(hostile) is None


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEEDS = [make() for make in (*REAL.values(), *BUILT.values())]


@st.composite
def _mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 4))
        choice = draw(st.integers(0, 2))
        if choice == 0:
            data[at] = draw(st.integers(0, 255))
        elif choice == 1:
            data[at : at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3, 31, 32, 0x7FFFFFFF, 0xFFFFFFFF, len(data)])))
        else:
            del data[draw(st.integers(128, len(data))) :]
            break
    return bytes(data)


@FUZZ
@given(_mutated())
def test_a_damaged_profile_is_cleaned_or_none_never_an_exception(data):
    cleaned = cleaned_profile(data)
    if cleaned is not None:
        assert len(cleaned) <= 2 * len(data) + 4096 and struct.unpack_from(">I", cleaned)[0] == len(cleaned)
        assert cleaned_profile(cleaned) == cleaned


# ---------------------------------------------------------------- in a DICOM object


def _with_profiles(profile: bytes, syntax=None) -> Dataset:
    """pydicom's RGB secondary capture with `profile` at the top level and in two optical paths, as a whole-slide
    image has them."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    assert not _leaks(_saved(ds))
    ds.ICCProfile = profile + b"\0" * (len(profile) % 2)
    paths = []
    for number in ("1", "2"):
        path = Dataset()
        path.OpticalPathIdentifier, path.ICCProfile = number, ds.ICCProfile
        paths.append(path)
    ds.OpticalPathSequence = paths
    return _reread(ds, syntax)


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
@pytest.mark.parametrize("make", [_palette_profile, _lcms_profile, BUILT["lutAB-v4"]], ids=["hp-v2", "lcms-v4", "lutAB-v4"])
def test_no_planted_name_in_a_profile_reaches_the_pool(make, syntax):
    original = make()
    planted = _planted(original) if make is not BUILT["lutAB-v4"] else original
    ds = _with_profiles(planted + NAME, syntax)  # and bytes past the profile's declared size
    assert _leaks(_saved(ds))
    result = deidentify(ds, KEY)
    data = _saved(ds)
    assert not _leaks(data), _leaks(data)
    written = pydicom.dcmread(io.BytesIO(data))
    profiles = [written.ICCProfile] + [path.ICCProfile for path in written.OpticalPathSequence]
    assert len(set(profiles)) == 1 and result.actions["C"] == 3
    _assert_clean(profiles[0], planted)
    assert _converted(profiles[0]) == _converted(original)


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_a_profile_that_cannot_be_read_is_removed(syntax):
    damaged = _with_u32(_planted(_lcms_profile()), 128, 0xFFFF)  # a tag table past the end
    ds = _with_profiles(damaged, syntax)
    result = deidentify(ds, KEY)
    data = _saved(ds)
    assert not _leaks(data)
    written = pydicom.dcmread(io.BytesIO(data))
    assert "ICCProfile" not in written and all("ICCProfile" not in path for path in written.OpticalPathSequence)
    assert [path.OpticalPathIdentifier for path in written.OpticalPathSequence] == ["1", "2"]
    assert result.actions["C"] == 0 and result.actions["X"] >= 3


def test_a_profile_written_as_text_is_removed_and_an_empty_one_stays():
    ds = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    ds.add(pydicom.DataElement(0x00282000, "LT", NAME.decode()))
    path = Dataset()
    path.OpticalPathIdentifier, path.ICCProfile = "1", b""
    ds.OpticalPathSequence = [path]
    deidentify(ds, KEY)
    written = pydicom.dcmread(io.BytesIO(_saved(ds)))
    assert "ICCProfile" not in written and written.OpticalPathSequence[0].ICCProfile in (b"", None)
