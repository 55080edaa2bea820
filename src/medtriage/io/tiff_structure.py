"""A TIFF's chain of image directories (IFDs), walked before tifffile opens the file: its own walk notices a loop only
among the first 100 IFDs and then runs on without end, reads every SubIFD listed whatever their number, and its
series detection takes time quadratic in the number of images; it also reads and parses every ImageDescription
whole. Torch-free, numpy-free: `struct` on the header bytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from medtriage.errors import InputError

MAX_TIFF_PAGES = 1024  # images (IFDs) in one slide file: a pyramid, its focal planes and a few associated images
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
MAX_TAGS_PER_IFD = 4096  # more is a damaged entry count (tifffile stops its own walk there too)
SUBIFDS_TAG = 330  # offsets of further images (OME-TIFF pyramid levels), each read by tifffile as one more image
DESCRIPTION_TAG = 270
# Bytes of one ImageDescription. Vendors write kilobytes (Aperio's key = value list) to a few megabytes (XML); tifffile
# and tiffslide split and parse it into Python objects whole, at up to 30 times its size and a second per megabyte.
MAX_DESCRIPTION_BYTES = 16 << 20


def check_ifd_chain(path: Path) -> None:
    """Walk the chain of image directories (IFDs) before tifffile does: its walk notices a loop only among the first
    100 and then runs on without end, and its series detection takes time quadratic in the number of images.
    A loop, more than MAX_TIFF_PAGES images (those the IFDs list as SubIFDs included, which tifffile reads whatever
    their number), or an ImageDescription over MAX_DESCRIPTION_BYTES is refused; a chain that breaks off or points
    past the end of the file is left to tifffile to report."""
    with open(path, "rb") as f:
        header = f.read(16)
        if header[:4] not in TIFF_MAGIC:
            return  # not a TIFF: tiffslide says so
        order, big = "<" if header[:2] == b"II" else ">", header[2:4] in (b"+\x00", b"\x00+")
        layout = (order, *(("Q", 20, "Q") if big else ("H", 12, "I")))  # byte order, entry count, entry size, offset
        offset = struct.unpack_from(order + layout[3], header, 8 if big else 4)[0] if len(header) == 16 else 0
        size = os.fstat(f.fileno()).st_size
        seen: set[int] = set()
        subifds = 0
        while 0 < offset < size:  # an offset past the end (up to 2**64 in a BigTIFF) is tifffile's to report
            if offset in seen:
                raise InputError(
                    f"damaged slide: the TIFF's chain of image directories loops back to the one at byte {offset}",
                    where=path,
                    hint="copy the slide again from the scanner or archive",
                )
            seen.add(offset)
            entries_at = offset
            offset, entries = _read_ifd(f, offset, *layout)
            subifds += sum(count for tag, _, count in entries if tag == SUBIFDS_TAG)
            _check_description(entries, entries_at, path)
            if len(seen) + subifds > MAX_TIFF_PAGES:
                raise InputError(
                    f"the TIFF holds more than {MAX_TIFF_PAGES} images ({len(seen)} image directories listing "
                    f"{subifds} SubIFDs so far); a slide holds its pyramid levels and a few associated images",
                    where=path,
                    hint="the file is damaged or is not one slide: copy it again, or export the slide again",
                )


def _check_description(entries: list[tuple[int, int, int]], at: int, path: Path) -> None:
    """Refuse an ImageDescription longer than MAX_DESCRIPTION_BYTES before tifffile reads and parses it."""
    for tag, _, count in entries:
        if tag == DESCRIPTION_TAG and count > MAX_DESCRIPTION_BYTES:
            raise InputError(
                f"the TIFF's image directory at byte {at} holds an ImageDescription of {count} bytes, over the limit of "
                f"{MAX_DESCRIPTION_BYTES} (scanners write a few kilobytes to a few megabytes of metadata there)",
                where=path,
                hint="the file is damaged or is not a slide: copy it again, or export the slide again",
            )


def _read_ifd(f, offset: int, order: str, count_format: str, entry_size: int, offset_format: str) -> tuple[int, list]:
    """(offset of the IFD after the one at `offset`, 0 where the chain ends or cannot be read on; its entries as
    (tag, type, count), as far as they can be read)."""
    f.seek(offset)
    raw = f.read(struct.calcsize(count_format))
    if len(raw) < struct.calcsize(count_format):
        return 0, []
    tags = struct.unpack(order + count_format, raw)[0]
    if tags > MAX_TAGS_PER_IFD:
        return 0, []
    entries = f.read(tags * entry_size)
    entry = struct.Struct(order + "HH" + offset_format)  # tag, type, count (the value or its offset follows)
    listed = [entry.unpack_from(entries, at) for at in range(0, len(entries) - entry_size + 1, entry_size)]
    raw = f.read(struct.calcsize(offset_format)) if len(entries) == tags * entry_size else b""
    return (struct.unpack(order + offset_format, raw)[0] if len(raw) == struct.calcsize(offset_format) else 0), listed
