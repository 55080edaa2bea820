"""Hostile image directory chains, walked before tifffile opens a slide: offsets a BigTIFF may state up to 2**64 (past
the end of any file, past what a seek accepts), and an ImageDescription long enough that parsing it costs gigabytes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medtriage.errors import InputError
from medtriage.io.slide_reader import open_slide
from medtriage.io.tiff_structure import MAX_DESCRIPTION_BYTES

RESOLUTION = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}  # 0.5 µm/pixel


def _bigtiff(path: Path) -> tuple[bytearray, int]:
    """A one-level tiled RGB BigTIFF, and the position of its first IFD's link to the next one."""
    tifffile.imwrite(path, np.full((256, 256, 3), (180, 90, 160), np.uint8), tile=(256, 256), bigtiff=True, **RESOLUTION)
    data = bytearray(path.read_bytes())
    first = struct.unpack_from("<Q", data, 8)[0]
    entries = struct.unpack_from("<Q", data, first)[0]
    return data, first + 8 + 20 * entries


@pytest.mark.parametrize("offset", [1 << 50, (1 << 64) - 16], ids=["past-the-end", "past-any-seek"])
@pytest.mark.parametrize("link", ["header", "next-ifd"])
def test_a_bigtiff_directory_offset_past_the_end_is_a_damaged_slide_not_a_crash(tmp_path, offset, link):
    """The walk sought to the offset: an OSError (Invalid argument) that `medtriage score` reported as an output
    folder it could not write, or a ValueError that stopped the whole batch."""
    path = tmp_path / "far.tif"
    data, next_link = _bigtiff(path)
    struct.pack_into("<Q", data, 8 if link == "header" else next_link, offset)
    path.write_bytes(data)
    if link == "header":
        with pytest.raises(InputError, match="damaged or truncated slide") as refused:
            open_slide(path)
        assert str(path) in str(refused.value) and "copy the slide again" in refused.value.hint
    else:  # tifffile reads the first image and stops at the broken link, as at any chain that breaks off
        with open_slide(path) as slide:
            assert slide.level_dimensions == [(256, 256)]


def _with_description(path: Path, description: bytes) -> Path:
    """A classic TIFF, one 256 x 256 deflated RGB tile, whose ImageDescription is `description`."""
    tile = zlib.compress(bytes(256 * 256 * 3))
    values_at = 8
    ifd_at = values_at + 6 + 16 + len(description) + len(description) % 2
    tile_at = ifd_at + 2 + 16 * 12 + 4
    tags = [
        (256, 3, 1, 256), (257, 3, 1, 256), (258, 3, 3, values_at), (259, 3, 1, 8), (262, 3, 1, 2),
        (270, 2, len(description), values_at + 22), (277, 3, 1, 3), (282, 5, 1, values_at + 6), (283, 5, 1, values_at + 14),
        (284, 3, 1, 1), (296, 3, 1, 3), (322, 3, 1, 256), (323, 3, 1, 256), (324, 4, 1, tile_at), (325, 4, 1, len(tile)),
    ]  # fmt: skip
    data = struct.pack("<2sHI", b"II", 42, ifd_at) + struct.pack("<3H4I", 8, 8, 8, 20000, 1, 20000, 1) + description
    data += b"\0" * (len(description) % 2) + struct.pack("<H", len(tags) + 1)
    data += b"".join(struct.pack("<HHII", *tag) for tag in [*tags, (65000, 3, 1, 0)]) + struct.pack("<I", 0)
    path.write_bytes(data + tile)
    return path


def test_an_image_description_of_megabytes_is_refused_before_tifffile_parses_it(tmp_path):
    """tifffile and tiffslide split an Aperio description at every '|' into a Python list: 64 MB of them took 42 s and
    1.3 GB, a gigabyte would take minutes and tens of gigabytes."""
    header = b"Aperio Image Library v10.0.0\r\n2048x2048 (256x256) JPEG/RGB Q=70|MPP = 0.5"
    path = _with_description(tmp_path / "long.svs", header + b"|" * (MAX_DESCRIPTION_BYTES + 1 - len(header)))
    with pytest.raises(InputError, match=f"ImageDescription of {MAX_DESCRIPTION_BYTES + 1} bytes, over the limit") as refused:
        open_slide(path)
    assert str(path) in str(refused.value) and "is not a slide" in refused.value.hint


def test_an_image_description_within_the_limit_still_opens(tmp_path):
    path = _with_description(tmp_path / "aperio.svs", b"Aperio Image Library v10.0.0\r\n256x256 (256x256) RAW|MPP = 0.25\0")
    with open_slide(path) as slide:
        assert slide.mpp == 0.25 and slide.read_region(0, 0, 0, (8, 8)).max() == 0
