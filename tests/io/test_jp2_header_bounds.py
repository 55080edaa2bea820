"""The values the boxes of a JP2 file's header keep, checked against their bounds (ISO/IEC 15444-1 Annex I) and
against the codestream they describe. Before, each box was cut to its fields and kept whatever those held: a channel
definition naming a channel the image does not have or one channel twice, a channel count past the box's end, an image
header whose size, component count or bit depths are not the codestream's, a Bits Per Component box missing where the
image header says it is needed, a resolution with a zero denominator, an enumerated colour space no standard defines. A
hostile or broken file passed them to every reader, and readers disagree on them: OpenJPEG through imagecodecs refuses
a bad channel definition that pydicom's OpenJPEG plugin decodes, and pydicom's plugin writes a palette's samples past
its buffer (a palette turns each sample into several, and it sizes the buffer by the codestream).

Now what a decoder reads, wrong, sends the file to quarantine (`damaged_compressed_frame`, as a frame that cannot be
walked); a box no decoder reads for the samples (resolution, an unused Bits Per Component box) goes, as does a bad
enumerated colour (replaced as an ICC profile is); and a valid file still decodes to the same pixels (OpenJPEG through
pydicom's plugin, pylibjpeg-openjpeg and imagecodecs)."""

from __future__ import annotations

import struct
import tracemalloc
import warnings
from collections import Counter
from collections.abc import Callable

import imagecodecs
import numpy as np
import openjpeg
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import InputError
from medtriage.io import stream_metadata
from medtriage.io.deid import DeidOptions, deidentify
from medtriage.io.ingest_file import init_worker, process_file
from medtriage.io.quarantine import screen
from tests.io.test_deid_stream_metadata import KEY, NAME, _box, _deidentified, _frames, _pixels, _planted, _read
from tests.io.test_jp2_boxes import GDCM, SIGNATURE, SRGB, _header_children, _in_header, _replaced, _top

GDCM_REMOVES = Counter({"JP2 uuid": 4, "JP2 rreq": 1})  # what GDCM's file loses whatever is planted in its header
ICC = Counter({"JP2 colr ICC": 1})
IHDR_FIELDS = {"height": 400, "width": 400, "components": 3, "bpc": 7, "compression": 7, "unknown": 1, "ipr": 0}
RESC = _box(b"resc", struct.pack(">4H2b", 2834, 1, 2834, 1, 0, 0))
RESD = _box(b"resd", struct.pack(">4H2b", 72, 254, 72, 254, 2, 2))
IN_ORDER = ((0, 0, 1), (1, 0, 2), (2, 0, 3))  # red, green, blue: colour channels in codestream order
PCLR = _box(b"pclr", struct.pack(">HB", 2, 3) + b"\x07\x07\x07" + bytes(range(6)))
CMAP = _box(b"cmap", b"".join(struct.pack(">HBB", 0, 1, column) for column in range(3)))


def _ihdr(**changed: int) -> bytes:
    return _box(b"ihdr", struct.pack(">LLHBBBB", *{**IHDR_FIELDS, **changed}.values()))


def _cdef(*entries: tuple[int, int, int], count: int | None = None) -> bytes:
    count = len(entries) if count is None else count
    return _box(b"cdef", struct.pack(">H", count) + b"".join(struct.pack(">HHH", *entry) for entry in entries))


def _res(*children: bytes) -> bytes:
    return _box(b"res ", b"".join(children))


def _header(*added: bytes, ihdr: bytes | None = None, res: bytes | None = None, colr: bytes | None = None):
    """A plant giving GDCM's JP2 Header (image header, ICC colour, resolution) the boxes `added` after its own, and
    another image header, resolution box (b"": none) or colour box where given."""
    replace = {b"ihdr": ihdr, b"res ": res, b"colr": colr}
    return _in_header(lambda kids: [box if replace.get(kind) is None else replace[kind] for kind, box in kids] + list(added))


def _swapped_first_two(kids: list[tuple[bytes, bytes]]) -> list[bytes]:
    boxes = [box for _, box in kids]
    return [boxes[1], boxes[0], *boxes[2:]]


# (plant, what the quarantine detail says)
QUARANTINED = {
    "channel-past-the-components": (_header(_cdef((0, 0, 1), (1, 0, 2), (7, 0, 3))), "defines channel 7"),
    "channel-defined-twice": (_header(_cdef((0, 0, 1), (1, 0, 2), (1, 0, 3))), "defines channel 1 twice"),
    "channel-not-defined": (_header(_cdef((0, 0, 1), (1, 0, 2))), "defines 2 of its 3 channels"),
    "channel-count-past-its-box": (_header(_cdef(*IN_ORDER, count=0x4000)), "declares 16384 channel definitions"),
    "no-channel-defined": (_header(_cdef()), "declares no channel"),
    "channel-type": (_header(_cdef((0, 0, 1), (1, 0, 2), (2, 0x4E41, 3))), "type 20033"),
    "channel-association": (_header(_cdef((0, 0, 1), (1, 0, 2), (2, 0, 9))), "with colour 9"),
    "two-channel-definitions": (_header(_cdef(*IN_ORDER), _cdef(*IN_ORDER)), "2 JP2 cdef boxes"),
    "palette": (_header(PCLR, CMAP), "a palette"),
    "palette-without-mapping": (_header(PCLR), "a palette"),
    "mapping-without-palette": (_header(CMAP), "a palette"),
    "components-not-the-codestreams": (_header(ihdr=_ihdr(components=4)), "4 components"),
    "height-not-the-codestreams": (_header(ihdr=_ihdr(height=401)), "height 401"),
    "width-not-the-codestreams": (_header(ihdr=_ihdr(width=4000)), "width 4000"),
    "depth-not-the-codestreams": (_header(ihdr=_ihdr(bpc=11)), "12-bit"),
    "no-components": (_header(ihdr=_ihdr(components=0)), "components (NC) is 0"),
    "no-height": (_header(ihdr=_ihdr(height=0)), "height is 0"),
    "depth-past-38-bits": (_header(ihdr=_ihdr(bpc=0x4F)), "bit depth (BPC) is 79"),
    "compression-type": (_header(ihdr=_ihdr(compression=8)), "compression type (C) is 8"),
    "colourspace-unknown-flag": (_header(ihdr=_ihdr(unknown=2)), "UnkC is 2"),
    "intellectual-property-flag": (_header(ihdr=_ihdr(ipr=0x4E)), "IPR is 78"),
    "image-header-short": (_header(ihdr=_box(b"ihdr", _ihdr()[8:21])), "13 bytes"),
    "two-image-headers": (_header(_ihdr()), "2 JP2 ihdr boxes"),
    "image-header-not-first": (_in_header(_swapped_first_two), "first box is not an image header"),
    "bit-depths-missing": (_header(ihdr=_ihdr(bpc=255)), "no Bits Per Component box"),
    "bit-depths-short": (_header(_box(b"bpcc", b"\x07\x07"), ihdr=_ihdr(bpc=255)), "2 bit depths for its 3"),
    "bit-depths-not-the-codestreams": (_header(_box(b"bpcc", b"\x07\x07\x0b"), ihdr=_ihdr(bpc=255)), "component 3 as 12-bit"),
    "bit-depth-past-38-bits": (_header(_box(b"bpcc", b"\x07\x07\x4f"), ihdr=_ihdr(bpc=255)), "bit depth 79"),
    "two-bit-depth-boxes": (_header(_box(b"bpcc", b"\x07" * 3), _box(b"bpcc", b"\x07" * 3), ihdr=_ihdr(bpc=255)), "2 JP2 bpcc"),
    "no-jp2-header": (_replaced(b"jp2h", lambda box: b""), "without a JP2 Header box before it"),
    "two-jp2-headers": (_replaced(b"jp2h", lambda box: box + box), "a second JP2 Header box"),
}


@pytest.mark.parametrize("where", QUARANTINED)
def test_a_header_value_out_of_its_bounds_or_not_the_codestreams_is_quarantined(where):
    plant, said = QUARANTINED[where]
    damaged = _planted(GDCM, plant)
    unsafe = screen(_read(damaged))
    assert unsafe is not None and unsafe.reason == "damaged_compressed_frame", unsafe
    assert said in unsafe.detail and "frame 1:" in unsafe.detail
    with pytest.raises(InputError, match="cannot be de-identified"):
        deidentify(_read(damaged), KEY)


@pytest.mark.parametrize("where", ["channel-past-the-components", "palette", "components-not-the-codestreams"])
def test_ingest_quarantines_them(tmp_path, where):
    plant, said = QUARANTINED[where]
    init_worker(KEY, DeidOptions(), frozenset(), False)
    path = tmp_path / "image.dcm"
    path.write_bytes(_planted(GDCM, plant))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = process_file(str(path))
    assert (outcome.status, outcome.reason) == ("quarantined", "damaged_compressed_frame"), outcome
    assert said in outcome.detail and not outcome.encoded


NO_RES = b""
# (plant, what the file loses besides GDCM's UUID and rreq boxes, the JP2 Header's children it leaves)
DROPPED = {
    "resolution-zero-denominator": (
        _header(res=_res(_box(b"resc", struct.pack(">4H2b", 2834, 0, 2834, 1, 0, 0)))),
        ICC + Counter({"JP2 res inconsistent": 1}),
        [_ihdr(), SRGB],
    ),
    "resolution-zero-numerator": (
        _header(res=_res(RESC, _box(b"resd", struct.pack(">4H2b", 0, 1, 72, 1, 0, 0)))),
        ICC + Counter({"JP2 res inconsistent": 1}),
        [_ihdr(), SRGB, _res(RESC)],
    ),
    "resolution-short": (
        _header(res=_res(_box(b"resc", b"\x0b\x12\x00\x01"), RESD)),
        ICC + Counter({"JP2 res inconsistent": 1}),
        [_ihdr(), SRGB, _res(RESD)],
    ),
    "second-capture-resolution": (
        _header(res=_res(RESC, RESD, _box(b"resc", struct.pack(">4H2b", 1, 1, 1, 1, 0, 0)))),
        ICC + Counter({"JP2 res inconsistent": 1}),
        [_ihdr(), SRGB, _res(RESC, RESD)],
    ),
    "empty-resolution": (_header(res=_res()), ICC + Counter({"JP2 res inconsistent": 1}), [_ihdr(), SRGB]),
    "second-resolution-box": (_header(_res(RESD)), ICC + Counter({"JP2 res inconsistent": 1}), [_ihdr(), SRGB, _res(RESC)]),
    "unused-bit-depths-not-the-headers": (
        _header(_box(b"bpcc", b"\x07\x07\x0b")),
        ICC + Counter({"JP2 bpcc inconsistent": 1}),
        [_ihdr(), SRGB, _res(RESC)],
    ),
    "enumerated-colour-space-undefined": (
        _header(colr=_box(b"colr", b"\x01\x00\x00" + NAME[:4])),
        Counter({"JP2 colr inconsistent": 1}),
        [_ihdr(), SRGB, _res(RESC)],
    ),
    "colour-approximation-out-of-range": (
        _header(colr=_box(b"colr", b"\x01\x00\x09" + struct.pack(">L", 16))),
        Counter({"JP2 colr inconsistent": 1}),
        [_ihdr(), SRGB, _res(RESC)],
    ),
    "intellectual-property-box-removed": (
        _header(ihdr=_ihdr(ipr=1)),
        ICC + Counter({"JP2 ihdr IPR": 1}),
        [_ihdr(), SRGB, _res(RESC)],
    ),
}


@pytest.mark.parametrize("where", DROPPED)
def test_a_box_no_decoder_reads_goes_where_it_is_out_of_bounds_and_the_pixels_stay(where):
    """Resolution is metadata (no decoder reads it for the samples), a Bits Per Component box is unused where the image
    header gives one depth for all, an enumerated colour is replaced as an ICC profile is, and IPR says an
    Intellectual Property box follows, which de-identification removes: the file is pooled without them."""
    plant, lost, children = DROPPED[where]
    planted = _planted(GDCM, plant)
    written, result = _deidentified(planted)
    jp2 = _frames(_read(written))[0]
    assert result.stream_metadata == GDCM_REMOVES + lost
    assert [box for _, box in _header_children(jp2)] == children
    assert NAME[:4] not in jp2
    assert np.array_equal(_pixels(written), _pixels(_planted(GDCM, lambda frame: frame)))
    original = _frames(pydicom.dcmread(get_testdata_file(GDCM)))[0]
    assert np.array_equal(imagecodecs.jpeg2k_decode(jp2), imagecodecs.jpeg2k_decode(original))


def _rgba_jp2(*children: bytes) -> tuple[bytes, np.ndarray]:
    """An RGBA JP2 file OpenJPEG wrote (through imagecodecs), with `children` after its JP2 Header's own and without
    the comment it writes in its codestream, and its image."""
    image = np.random.default_rng(7).integers(0, 256, (24, 40, 4), dtype=np.uint8)
    boxes = dict(_top(imagecodecs.jpeg2k_encode(image, level=0, codecformat="jp2")))
    codestream = boxes[b"jp2c"][8:]
    codestream = stream_metadata._applied(codestream, stream_metadata._j2k(codestream).edits)
    header = _box(b"jp2h", boxes[b"jp2h"][8:] + b"".join(children))
    return SIGNATURE + boxes[b"ftyp"] + header + _box(b"jp2c", codestream), image


ALPHA = ((0, 0, 1), (1, 0, 2), (2, 0, 3), (3, 1, 0))  # the fourth channel the opacity of the whole image


def test_a_valid_header_with_channel_definitions_and_resolution_stays_byte_for_byte():
    jp2, image = _rgba_jp2(_cdef(*ALPHA), _res(RESC, RESD))
    assert stream_metadata._jp2(jp2).edits == []
    assert np.array_equal(openjpeg.decode(jp2), image)
    assert np.array_equal(imagecodecs.jpeg2k_decode(jp2), image)


def test_a_cleaned_valid_file_decodes_to_the_same_pixels_with_both_openjpeg_bindings():
    """Bytes past the channel definitions and the capture resolution go; what stays still decodes to the image."""
    planted, image = _rgba_jp2(_box(b"cdef", _cdef(*ALPHA)[8:] + NAME), _res(_box(b"resc", RESC[8:] + NAME), RESD))
    walk = stream_metadata._jp2(planted)
    cleaned = stream_metadata._applied(planted, walk.edits)
    assert NAME not in cleaned
    assert walk.removed == Counter({"JP2 cdef excess": 1, "JP2 res excess": 1})
    assert cleaned == _rgba_jp2(_cdef(*ALPHA), _res(RESC, RESD))[0]
    assert np.array_equal(openjpeg.decode(cleaned), image)
    assert np.array_equal(imagecodecs.jpeg2k_decode(cleaned), image)


def test_a_valid_palette_is_quarantined_as_pydicoms_openjpeg_plugin_sizes_its_buffer_by_the_codestream():
    """A palette within every bound: the decoders expand each index through it into three samples, while
    pylibjpeg-openjpeg (pydicom's plugin) sizes its output by the codestream's one component, and writes the other two
    past it (it crashes the process). DICOM gives a palette in the data set (PALETTE COLOR), never in the frame."""
    indices = np.random.default_rng(3).integers(0, 2, (16, 24), dtype=np.uint8)
    codestream = imagecodecs.jpeg2k_encode(indices, level=0, codecformat="j2k")
    ihdr = _box(b"ihdr", struct.pack(">LLHBBBB", 16, 24, 1, 7, 7, 0, 0))
    ftyp = _box(b"ftyp", b"jp2 \0\0\0\0jp2 ")
    jp2 = SIGNATURE + ftyp + _box(b"jp2h", ihdr + SRGB + PCLR + CMAP) + _box(b"jp2c", codestream)
    palette = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(imagecodecs.jpeg2k_decode(jp2), palette[indices])  # three samples a pixel
    assert openjpeg.get_parameters(jp2)["samples_per_pixel"] == 1  # what pydicom's plugin sizes its buffer by
    with pytest.raises(stream_metadata.DamagedFrame, match="a palette"):
        stream_metadata._jp2(jp2)


SIZE_CLAIMS: dict[str, Callable[[bytes], bytes]] = {
    "channel-count": _header(_cdef(*IN_ORDER, count=0xFFFF)),
    "palette-entries": _header(_box(b"pclr", struct.pack(">HB", 0xFFFF, 255) + b"\x25" * 255), CMAP),
    "box-length": _header(struct.pack(">L", 1) + b"cdef" + struct.pack(">Q", 1 << 62)),
}


@pytest.mark.parametrize("claim", SIZE_CLAIMS)
def test_sizes_the_file_claims_are_bounded_before_anything_is_allocated(claim):
    """A channel count, a palette's entries (65535 of 255 columns, 38 bits each: 83 MB) and a box length (2^62 bytes)
    claimed by a small file: each is refused without allocating what it claims."""
    gdcm = _frames(pydicom.dcmread(get_testdata_file(GDCM)))[0]
    jp2 = b"".join(box for _, box in _top(SIZE_CLAIMS[claim](gdcm)))  # without the fragment's padding
    tracemalloc.start()
    try:
        with pytest.raises(stream_metadata.DamagedFrame):
            stream_metadata._jp2(jp2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(jp2) + (1 << 20)
