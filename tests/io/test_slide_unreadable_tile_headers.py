"""JPEG tiles and strips whose frame header cannot be read the way the size check reads it: libjpeg skips bytes it does
not understand before a marker and decodes at whatever size the frame header it finds declares, so such a chunk is
refused, never decoded unchecked. An NDPI chunk holds only its scan: its frame header is the file's."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medtriage.errors import InputError
from medtriage.io.slide_reader import _check_chunk_header, open_slide
from tests.io.test_slide_and_j2k_parsing_limits import RESOLUTION, outcome_and_peak_bytes, with_jpeg_size_claim

pytest.importorskip("imagecodecs")

COLOUR = (180, 90, 160)
UNREADABLE = "0 has no JPEG marker at byte 2 before its frame header (SOF); it was not decoded"


def with_app0_blanked(source: Path, path: Path) -> Path:
    """`source` with the JFIF segment (APP0) of its first JPEG chunk overwritten by zero bytes: no marker where the
    size check looks for one, bytes libjpeg skips (with a warning) on its way to the frame header."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        offset = tif.series[0].keyframe.dataoffsets[0]
    assert data[offset : offset + 4] == b"\xff\xd8\xff\xe0"
    length = struct.unpack_from(">H", data, offset + 4)[0]
    data[offset + 2 : offset + 4 + length] = bytes(2 + length)
    path.write_bytes(data)
    return path


def jpeg_tiff(tmp_path: Path, **layout) -> Path:
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), COLOUR, np.uint8), photometric="rgb", compression="jpeg", **layout, **RESOLUTION)
    return path


def test_a_jpeg_tile_whose_frame_header_cannot_be_read_is_refused_before_it_is_decoded(tmp_path):
    """Before, the check let it through and libjpeg decoded its 2 kB into the 48 MB its header declares."""
    claims = with_jpeg_size_claim(jpeg_tiff(tmp_path, tile=(256, 256)), tmp_path / "claims.tif", 0, 4000, 4000)
    path = with_app0_blanked(claims, tmp_path / "blanked.tif")
    with open_slide(path) as slide:
        assert np.abs(slide.read_region(256, 0, 0, (256, 256)).astype(int) - COLOUR).max() < 8  # the other tiles read
        refused, peak = outcome_and_peak_bytes(lambda: slide.read_region(0, 0, 0, (256, 256)))
    assert isinstance(refused, InputError) and refused.where == str(path)
    assert f"tile {UNREADABLE}" in str(refused) and "level 0" in str(refused) and refused.hint
    assert peak < 16 << 20


def test_a_jpeg_strip_whose_frame_header_cannot_be_read_is_refused_before_it_is_decoded(tmp_path):
    claims = with_jpeg_size_claim(jpeg_tiff(tmp_path, rowsperstrip=64), tmp_path / "claims.tif", 0, 4000, 4000)
    path = with_app0_blanked(claims, tmp_path / "blanked.tif")
    with open_slide(path) as slide:
        assert np.abs(slide.read_region(0, 64, 0, (512, 448)).astype(int) - COLOUR).max() < 8
        refused, peak = outcome_and_peak_bytes(lambda: slide.read_region(0, 0, 0, (64, 8)))
    assert isinstance(refused, InputError) and refused.where == str(path)
    assert f"strip {UNREADABLE}" in str(refused)
    assert peak < 16 << 20


def ndpi_like(tmp_path: Path, height: int, width: int):
    """A real JPEG tile split as NDPI stores its tiles: the frame header (up to the scan) kept by the page, the chunk
    holding only the scan. Returns the page (still open) and the chunk."""
    path = with_jpeg_size_claim(jpeg_tiff(tmp_path, tile=(256, 256)), tmp_path / "claims.tif", 0, height, width)
    tif = tifffile.TiffFile(path)
    page = tif.series[0].keyframe
    with open(path, "rb") as f:
        f.seek(page.dataoffsets[0])
        tile = f.read(page.databytecounts[0])
    sos = tile.index(b"\xff\xda")
    scan = sos + 2 + struct.unpack_from(">H", tile, sos + 2)[0]
    page.jpegheader = tile[:scan]
    return tif, page, tile[scan:]


def test_an_ndpi_chunk_is_checked_against_the_frame_header_it_is_decoded_with(tmp_path):
    tif, page, chunk = ndpi_like(tmp_path, 256, 256)
    with tif:
        _check_chunk_header(page, chunk, 0)  # the chunk alone has no frame header: it is the file's
        decoded = page.decode(chunk, 0, jpegheader=page.jpegheader)[0]
        assert np.abs(decoded.reshape(256, 256, 3).astype(int) - COLOUR).max() < 8
    tif, page, chunk = ndpi_like(tmp_path, 4000, 4000)
    with tif, pytest.raises(ValueError, match="tile 0 declares 48000000 samples"):
        _check_chunk_header(page, chunk, 0)


def with_offsets_listed(source: Path, path: Path, count: int) -> Path:
    """`source` (classic little-endian TIFF) with its first image's TileOffsets and TileByteCounts listing `count` tiles."""
    data = bytearray(source.read_bytes())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    for at in range(ifd + 2, ifd + 2 + 12 * entries, 12):
        if struct.unpack_from("<H", data, at)[0] in (324, 325):  # TileOffsets, TileByteCounts
            struct.pack_into("<I", data, at + 4, count)
    path.write_bytes(data)
    return path


def test_a_level_listing_fewer_tiles_than_its_size_needs_is_refused_at_open(tmp_path):
    """Before, it opened, and a read of a missing tile failed as "cannot decode slide tile data ... (IndexError: tuple
    index out of range)"."""
    path = with_offsets_listed(jpeg_tiff(tmp_path, tile=(256, 256)), tmp_path / "short.tif", 2)
    with pytest.raises(InputError, match="level 0 lists 2 of the 4 tiles its size needs") as refused:
        open_slide(path)
    assert refused.value.where == str(path) and refused.value.hint
