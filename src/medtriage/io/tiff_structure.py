"""A TIFF's chain of image directories (IFDs), walked before tifffile opens the file: its own walk notices a loop only
among the first 100 IFDs and then runs on without end, reads every SubIFD listed whatever their number, and its
series detection takes time quadratic in the number of images. Torch-free, numpy-free: `struct` on the header bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

from medtriage.errors import InputError

MAX_TIFF_PAGES = 1024  # images (IFDs) in one slide file: a pyramid, its focal planes and a few associated images
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
MAX_TAGS_PER_IFD = 4096  # more is a damaged entry count (tifffile stops its own walk there too)
SUBIFDS_TAG = 330  # offsets of further images (OME-TIFF pyramid levels), each read by tifffile as one more image


def check_ifd_chain(path: Path) -> None:
    """Walk the chain of image directories (IFDs) before tifffile does: its walk notices a loop only among the first
    100 and then runs on without end, and its series detection takes time quadratic in the number of images.
    A loop, or more than MAX_TIFF_PAGES images (those the IFDs list as SubIFDs included, which tifffile reads
    whatever their number), is refused; a chain that breaks off is left to tifffile to report."""
    with open(path, "rb") as f:
        header = f.read(16)
        if header[:4] not in TIFF_MAGIC:
            return  # not a TIFF: tiffslide says so
        order, big = "<" if header[:2] == b"II" else ">", header[2:4] in (b"+\x00", b"\x00+")
        count_format, entry_size, offset_format = ("Q", 20, "Q") if big else ("H", 12, "I")
        offset = struct.unpack_from(order + offset_format, header, 8 if big else 4)[0] if len(header) == 16 else 0
        seen: set[int] = set()
        subifds = 0
        while offset:
            if offset in seen:
                raise InputError(
                    f"damaged slide: the TIFF's chain of image directories loops back to the one at byte {offset}",
                    where=path,
                    hint="copy the slide again from the scanner or archive",
                )
            seen.add(offset)
            offset, listed = _read_ifd(f, offset, order, count_format, entry_size, offset_format)
            subifds += listed
            if len(seen) + subifds > MAX_TIFF_PAGES:
                raise InputError(
                    f"the TIFF holds more than {MAX_TIFF_PAGES} images ({len(seen)} image directories listing "
                    f"{subifds} SubIFDs so far); a slide holds its pyramid levels and a few associated images",
                    where=path,
                    hint="the file is damaged or is not one slide: copy it again, or export the slide again",
                )


def _read_ifd(f, offset: int, order: str, count_format: str, entry_size: int, offset_format: str) -> tuple[int, int]:
    """(offset of the IFD after the one at `offset`, 0 where the chain ends or cannot be read on; the number of
    SubIFDs it lists)."""
    f.seek(offset)
    raw = f.read(struct.calcsize(count_format))
    if len(raw) < struct.calcsize(count_format):
        return 0, 0
    tags = struct.unpack(order + count_format, raw)[0]
    if tags > MAX_TAGS_PER_IFD:
        return 0, 0
    entries = f.read(tags * entry_size)
    entry = struct.Struct(order + "HH" + offset_format)  # tag, type, count (the value or its offset follows)
    listed = [entry.unpack_from(entries, at) for at in range(0, len(entries) - entry_size + 1, entry_size)]
    subifds = sum(count for tag, _, count in listed if tag == SUBIFDS_TAG)
    raw = f.read(struct.calcsize(offset_format)) if len(entries) == tags * entry_size else b""
    return (struct.unpack(order + offset_format, raw)[0] if len(raw) == struct.calcsize(offset_format) else 0), subifds
