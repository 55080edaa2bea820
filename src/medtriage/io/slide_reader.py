"""Whole-slide image reading: open a slide, know its µm/pixel, read regions fast.

numpy + PIL + tiffslide only (the inference side installs without torch). tiffslide opens
Aperio SVS, generic tiled TIFF and the other TIFF-based formats it knows (NDPI, SCN, BIF,
OME-TIFF) without system libraries. Tiles are read from the TIFF's own JPEG/LZW/... tiles
through tifffile's decoder with a small cache, several times faster than going through
zarr (docs/benchmarks.md); pages the fast path does not handle fall back to `TiffSlide.read_region`.
DICOM whole-slide images (VL Whole Slide Microscopy Image Storage: a folder holding the series'
files) are read through `wsidicom` (the optional `medtriage[wsi]` extra).

Coordinates are level-0 pixels `(x, y)`.
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes
from tqdm.auto import tqdm

from medtriage.errors import DataNotFoundError, InputError, MedTriageError, printable
from medtriage.io.clamped import ClampedReader, bounded_source, read_part10
from medtriage.io.decode_limits import j2k_samples, jpeg_samples
from medtriage.io.tiff_structure import TIFF_MAGIC, check_ifd_chain

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")
MPP_HINT = "pass the scan resolution explicitly (e.g. --mpp 0.25 for 40x, --mpp 0.5 for 20x)"
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
READ_BLOCK_BYTES = 64 << 20  # RGB bytes of a level decoded at once when a whole level is read (thumbnail, tissue mask)
MAX_WHOLE_IMAGE_BYTES = 256 << 20  # RGB bytes of a whole-level image: a 7.5 cm square of tissue at the mask's 8 µm/pixel
# Pixels of a level decoded block by block into a whole-level image (a slide without coarse levels): 65,536 square, a
# 3.3 cm square at 20x. Repeated tile offsets let a small file claim far more.
MAX_SHRUNK_LEVEL_PIXELS = 1 << 32
PYRAMID_HINT = "convert it to a pyramidal TIFF, e.g. `vips tiffsave SLIDE OUT.tif --tile --pyramid --compression jpeg`"
MAX_CHUNK_BYTES = 256 << 20  # decoded bytes of one tile or strip: a decoder allocates what the tags claim, whatever the data
TILE_CACHE_BYTES = 128 << 20  # decoded tiles one reader keeps: 680 of 256 pixels (a row across a large slide), fewer larger ones
# What one cached tile costs beyond its pixels (its array, key and entry): a file of 1 x 1 pixel tiles would otherwise
# fill the budget with 44 million entries, 500 bytes each.
CACHE_ENTRY_BYTES = 512
MIN_MPP = 0.05  # µm/pixel: a quarter of what light microscopes resolve; anything finer is a damaged tag
MAX_MPP = 1000.0  # µm/pixel: a millimetre a pixel, coarser than a photograph of the whole glass slide; a damaged tag
BRIGHTFIELD_HINT = (
    "the pathology models read 8-bit RGB brightfield slides (H&E, IHC): export the slide as 8-bit RGB "
    "(SVS, a tiled pyramidal TIFF or a DICOM whole-slide image)"
)
TIFF_COLOUR_PHOTOMETRICS = (2, 6)  # RGB, YCbCr: what a brightfield scanner writes (CMYK or a palette would read as RGB)
DICOM_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
CHUNK_HEADER_READERS = {7: jpeg_samples, 33003: j2k_samples, 33005: j2k_samples, 34712: j2k_samples}  # by TIFF Compression
FRAME_HEADER_READERS = {  # by DICOM Transfer Syntax UID
    **dict.fromkeys([*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes], jpeg_samples),
    **dict.fromkeys(JPEG2000TransferSyntaxes, j2k_samples),
}
OME_UNITS_IN_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}  # OME-XML PhysicalSizeXUnit values


def is_slide_path(path: str | Path) -> bool:
    """A TIFF-based slide file, or a folder holding a DICOM whole-slide image."""
    path = Path(path)
    return path.suffix.lower() in SLIDE_SUFFIXES or (path.is_dir() and is_dicom_wsi_folder(path))


def is_dicom_wsi_file(path: str | Path) -> bool:
    """True for a DICOM file of a whole-slide image (one level or one associated image of the series)."""
    return _wsi_header(Path(path)) is not None


def _wsi_header(path: Path) -> FileDataset | None:
    """The header of a whole-slide image file (its SOP Class UID and file meta); None for any other file."""
    try:  # pydicom converts values lazily: a damaged SOP Class UID raises on `get`
        header = _header(path, ["SOPClassUID"])
        return header if str(header.get("SOPClassUID", "")) == WSI_SOP_CLASS else None
    except Exception:  # not DICOM, or unreadable: not a whole-slide image either
        return None


def _header(path: Path, tags: list[str]) -> FileDataset:
    """`tags` of a DICOM file's header, as pydicom.dcmread(stop_before_pixels=True, specific_tags=tags) reads them,
    except that a deflated data set is inflated no further than they reach, within the decode limits (pydicom inflates
    one whole first: a file of kilobytes can inflate to gigabytes)."""
    with bounded_source(path, str(path)) as source:
        return read_part10(source, str(path), stop_before_pixels=True, specific_tags=tags)


def _deflated(header: FileDataset) -> bool:
    return header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def dicom_wsi_files(folder: str | Path) -> Iterator[Path]:
    """The whole-slide image files directly in `folder`, sorted (hidden files skipped)."""
    return (path for path, _ in _wsi_headers(folder))


def _wsi_headers(folder: str | Path) -> Iterator[tuple[Path, FileDataset]]:
    """`dicom_wsi_files`, each with its header (`_wsi_header`)."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.name.startswith(".") and (header := _wsi_header(path)) is not None:
            yield path, header


def is_dicom_wsi_folder(folder: str | Path) -> bool:
    return next(dicom_wsi_files(folder), None) is not None


def level_pixel(x0: int, downsample: float) -> int:
    """The pixel of a level `downsample` times coarser starting nearest level-0 pixel `x0`, halves up: the one rule of
    every reader. tiffslide's own floors, and Python's round() takes halves to even (3 and 5 would both start at 2)."""
    return math.floor(x0 / downsample + 0.5)


@functools.cache
def _placed_tiffslide() -> type:
    """tiffslide's TiffSlide placing level-0 positions on a level by `level_pixel`, through the hook it offers for
    that: a level it reads (one the fast path does not) starts where the fast path and wsidicom would start."""
    import tiffslide

    class PlacedTiffSlide(tiffslide.TiffSlide):
        def _read_region_loc_transform(self, location: tuple[int, int], level: int) -> tuple[int, int]:
            ds = self.level_downsamples[level]
            return level_pixel(location[0], ds), level_pixel(location[1], ds)

    return PlacedTiffSlide


class _Levels:
    """What every slide offers on top of its level sizes, `mpp` and `shared_reader`."""

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def finest_level_for(self, mpp: float) -> int:
        """Coarsest level whose pixels are still at least as fine as `mpp` (1% slack)."""
        fine_enough = [lv for lv in range(self.level_count) if self.level_mpp(lv) <= mpp * 1.01]
        return max(fine_enough, key=self.level_mpp) if fine_enough else 0

    def level_position(self, x0: int, y0: int, level: int) -> tuple[int, int]:
        """Level-0 `(x0, y0)` in the pixel coordinates of `level` (`level_pixel`)."""
        ds = self.level_downsamples[level]
        return level_pixel(x0, ds), level_pixel(y0, ds)

    def read_region(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 RGB `[h, w, 3]` of `size=(w, h)` pixels at `level`, top-left at level-0 `(x0, y0)`."""
        return self.shared_reader.read(x0, y0, level, size)

    def level_image(self, level: int, scale: float = 1.0) -> Image.Image:
        """The whole of `level`, shrunk by `scale` (≤ 1, box filter). The sizes come from the file: a level of more
        than `READ_BLOCK_BYTES` is read and shrunk block by block, so a slide without coarse pyramid levels is never
        decoded into memory whole; the image returned is bounded by `MAX_WHOLE_IMAGE_BYTES`, and the pixels decoded
        for it by `MAX_SHRUNK_LEVEL_PIXELS`."""
        w, h = self.level_dimensions[level]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size[0] * size[1] * 3 > MAX_WHOLE_IMAGE_BYTES:
            raise InputError(
                f"an image of {size[0]} x {size[1]} pixels of the whole of level {level} ({w} x {h}) exceeds the limit "
                f"of {MAX_WHOLE_IMAGE_BYTES} bytes",
                where=self.path,
                hint="the slide claims an implausible size, or needs a coarser level or a smaller image of it",
            )
        if w * h * 3 <= READ_BLOCK_BYTES:
            image = Image.fromarray(self.read_region(0, 0, level, (w, h)))
            return image if image.size == size else image.resize(size, Image.Resampling.BOX)
        if w * h > MAX_SHRUNK_LEVEL_PIXELS:
            raise InputError(
                f"level {level} ({w} x {h} pixels) would be decoded whole for an image of {size[0]} x {size[1]}: more "
                f"than the limit of {MAX_SHRUNK_LEVEL_PIXELS} pixels (the slide has no level coarse enough)",
                where=self.path,
                hint=f"the slide claims an implausible size, or lacks a pyramid: {PYRAMID_HINT}",
            )
        return self._shrunk_in_blocks(level, size)

    def _shrunk_in_blocks(self, level: int, size: tuple[int, int]) -> Image.Image:
        (w, h), downsample = self.level_dimensions[level], self.level_downsamples[level]
        out = Image.new("RGB", size)
        sx, sy = size[0] / w, size[1] / h
        block = max(1, math.isqrt(READ_BLOCK_BYTES // 3))  # side of a square block, in pixels of the level
        bands = range(0, h, block)  # a level of billions of pixels takes minutes: say how far it is
        for y in tqdm(bands, desc=f"{self.path.name}: level {level} ({w} x {h})", unit="band", leave=False):
            for x in range(0, w, block):
                bw, bh = min(block, w - x), min(block, h - y)
                box = (round(x * sx), round(y * sy), round((x + bw) * sx), round((y + bh) * sy))
                if box[2] > box[0] and box[3] > box[1]:
                    rgb = self.read_region(round(x * downsample), round(y * downsample), level, (bw, bh))
                    out.paste(Image.fromarray(rgb).resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BOX), box[:2])
        return out

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """uint8 RGB `[h, w, 3]` of the whole slide, longest side `max_side`."""
        w0, h0 = self.dimensions
        level = self.finest_level_for(self.mpp * max(w0, h0) / max_side)
        return np.asarray(self.level_image(level, min(1.0, max_side / max(self.level_dimensions[level]))))

    def _structure_or_close(self, read_structure, unreadable) -> None:
        """Read the levels' structure from an opened slide. Damaged tags surface as any type, here or in the readers'
        lazy attributes: on failure the slide is closed and the error is typed (`unreadable(err)`)."""
        try:
            read_structure()
        except Exception as err:
            try:
                self.close()
            except Exception as close_err:  # the structure's error is the one to act on; the close's rides along
                err.add_note(f"closing the slide afterwards also failed: {close_err}")
            if isinstance(err, MedTriageError):
                raise
            raise unreadable(err) from err

    def __enter__(self) -> _Levels:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked_mpp(override: float | None, path: Path) -> float | None:
    return None if override is None else _plausible_mpp(float(override), path, "the override")


def within_mpp_limits(mpp: float) -> bool:
    """Whether a resolution lies from MIN_MPP to MAX_MPP µm/pixel (NaN does not)."""
    return MIN_MPP <= mpp <= MAX_MPP


def _plausible_mpp(mpp: float, path: Path, source: str) -> float:
    """A damaged or hostile tag must not size the tile grid: at 0.001 µm/pixel one tile spans the whole slide, and at
    1e308 its size in pixels overflows."""
    if not within_mpp_limits(mpp):
        raise InputError(
            f"implausible scan resolution from {source}: {mpp:.4g} µm/pixel (light microscopes resolve no finer than "
            f"about 0.2 µm; the limits are {MIN_MPP:g} to {MAX_MPP:g})",
            where=path,
            hint=MPP_HINT,
        )
    return mpp


def _ome_mpp(tif, width: int, height: int) -> float | None:
    """µm/pixel of the OME-XML image of this size (OME-TIFF keeps it there, not in the resolution tags)."""
    if not tif.is_ome:
        return None
    from xml.etree import ElementTree

    try:
        ome = ElementTree.fromstring(tif.ome_metadata)
    except ElementTree.ParseError:
        return None  # damaged OME-XML: as if it said nothing
    for pixels in ome.iter():
        if pixels.tag.rsplit("}", 1)[-1] == "Pixels" and (pixels.get("SizeX"), pixels.get("SizeY")) == (str(width), str(height)):
            size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
            try:
                return float(size) * OME_UNITS_IN_UM[unit] if size else None
            except (KeyError, ValueError):
                return None
    return None


class Slide(_Levels):
    """An opened TIFF-based whole-slide image. `mpp` (µm/pixel at level 0) is always known once opened."""

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataNotFoundError("slide file not found", where=self.path)
        self._fd: int | None = None
        self._shared_reader: RegionReader | None = None
        check_ifd_chain(self.path)
        try:
            # Without _multifile, tifffile opens the files an OME-TIFF's XML names (`../`, absolute paths) and reads
            # their pages as this slide's: a header value must never become a path.
            self._slide = _placed_tiffslide()(self.path, tifffile_options={"_multifile": False})
        except Exception as err:  # tifffile raises many types for non-TIFF or damaged headers
            raise _unreadable(self.path, err) from err
        self._structure_or_close(lambda: self._read_structure(mpp), lambda err: _unreadable(self.path, err))

    def _read_structure(self, mpp: float | None) -> None:
        series = self._slide.ts_tifffile.series[self._slide.properties["tiffslide.series-index"]]
        for level, pages in enumerate(series.levels):  # every level: a coarse one is what the tiles may be read from
            _check_brightfield(_tiff_pixels(pages), self.path, level)
        self._levels = series.levels
        self.dimensions = tuple(int(v) for v in self._slide.dimensions)
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        _check_level_shapes(self.level_dimensions, [_tile_size(level.keyframe) for level in self._levels], self.path)
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        self.mpp = self._resolve_mpp(mpp)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._fd_closer = weakref.finalize(self, os.close, self._fd)  # a slide dropped unclosed still gives it back
        self._check_not_truncated()
        for level, pages in enumerate(self._levels):  # the other images (thumbnail, label) are optional, read guarded
            _check_chunk_count(pages.keyframe, f"level {level}", self.path)
        self._check_chunk_sizes()
        self._fast_levels = [_fast_path_ok(level.keyframe) for level in self._levels]  # tifffile page flags are not cheap

    def _resolve_mpp(self, override: float | None) -> float:
        checked = _checked_mpp(override, self.path)
        if checked is not None:
            return checked
        mpp = self._slide.properties.get("tiffslide.mpp-x") or _ome_mpp(self._slide.ts_tifffile, *self.dimensions)
        if not mpp:
            raise InputError("no resolution metadata (µm/pixel) in the slide", where=self.path, hint=MPP_HINT)
        return _plausible_mpp(float(mpp), self.path, "the slide's metadata")

    def _check_not_truncated(self) -> None:
        """Every level, and every other image of the file (thumbnail, label, macro), must hold its data inside the
        file: tifffile reads a strip or tile by the byte count its tags claim, allocating the claim first."""
        size = os.fstat(self._fd).st_size
        pages = [(f"level {level}", self._levels[level].keyframe) for level in range(len(self._levels))]
        pages += [(f"image {index} of the file", page) for index, page in enumerate(self._slide.ts_tifffile.pages)]
        for what, page in pages:
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
            if ends and max(ends) > size:
                raise InputError(
                    f"truncated slide: the pixel data of {what} ends at byte {max(ends)}, file has {size} bytes",
                    where=self.path,
                    hint="copy the slide again from the scanner or archive",
                )

    def _check_chunk_sizes(self) -> None:
        """Reading any pixel of a level decodes its whole tile (or strip), sized by the tags: a few kilobytes of
        compressed data can claim gigabytes. Refuse such a level before anything is decoded."""
        for level, pages in enumerate(self._levels):
            page = pages.keyframe
            claimed = math.prod(page.chunks) * np.dtype(page.dtype or np.uint8).itemsize
            if claimed > MAX_CHUNK_BYTES:
                kind = "tile" if page.is_tiled else "strip"
                raise InputError(
                    f"level {level} is stored in {kind}s of {' x '.join(map(str, page.chunks))} samples ({claimed} bytes "
                    f"each when decoded), over the limit of {MAX_CHUNK_BYTES} bytes",
                    where=self.path,
                    hint="export the slide again as a tiled pyramidal TIFF or SVS with tiles of at most a few thousand pixels",
                )

    @property
    def shared_reader(self) -> RegionReader:
        """The reader of this thread of control: mask, stain fit and tiles share its decoded tiles."""
        if self._shared_reader is None:
            self._shared_reader = RegionReader(self)
        return self._shared_reader

    def reader(self) -> RegionReader:
        """A reader for another thread: its own cache, seeded (read-only) with what is decoded so far."""
        return RegionReader(self, seed=dict(self.shared_reader._cache))

    def scanner_thumbnail(self) -> Image.Image | None:
        """The RGB thumbnail the scanner stored, if any, if it shows the whole slide (same aspect) and if its tags
        claim no more than `MAX_WHOLE_IMAGE_BYTES` (its decode allocates what they claim)."""
        # The thumbnail series decoded straight to RGB: tiffslide's associated_images adds PIL copies
        # and conversions that cost as much as the decode.
        try:
            first = self._slide.properties["tiffslide.series-index"] + 1
            series = next((s for s in self._slide.ts_tifffile.series[first:] if s.name.lower() == "thumbnail"), None)
            if series is None or not self._usable_thumbnail(series.shape, series.dtype, series.keyframe.chunks):
                return None
            self._check_chunk_headers(series.keyframe)
            return Image.fromarray(np.ascontiguousarray(series.asarray(maxworkers=1)[..., :3]))
        except Exception:  # a damaged associated image only costs us the shortcut
            return None

    def _usable_thumbnail(self, shape: tuple, dtype, chunks: tuple) -> bool:
        if dtype != np.uint8 or len(shape) != 3 or shape[-1] not in (3, 4) or min(shape) < 1:
            return False
        if math.prod(shape) > MAX_WHOLE_IMAGE_BYTES or math.prod(chunks) > MAX_CHUNK_BYTES:
            return False
        (w0, h0), (height, width) = self.dimensions, shape[:2]
        return abs(width / height - w0 / h0) < 0.01 * w0 / h0

    def _check_chunk_headers(self, page) -> None:
        for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            if count:
                _check_chunk_header(page, os.pread(self._fd, count, offset), index)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self._fd_closer()
            self._fd = None
        self._slide.close()


class RegionReader:
    """Reads regions tile by tile straight from the TIFF, keeping recently decoded tiles."""

    def __init__(self, slide: Slide, seed: dict | None = None):
        self.slide = slide
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0  # bounded in bytes, not tiles: a file may hold tiles of a few megabytes each
        self._seed = seed or {}  # tiles another reader decoded; never modified here
        self._checked_chunks: set[tuple[int, int]] = set()  # (level, chunk) whose header fits, off the fast path

    def read(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
        return white_beyond_edge(self.slide, self._read_inside, x0, y0, level, size)

    def _read_inside(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            if not self.slide._fast_levels[level]:
                self._check_headers_under(level, self.slide.level_position(x0, y0, level)[1], size[1])
                region = self.slide._slide.read_region((x0, y0), level, size, as_array=True)
                return np.ascontiguousarray(region[..., :3], dtype=np.uint8)
            x, y = self.slide.level_position(x0, y0, level)
            return self._assemble(self.slide._levels[level].keyframe, level, x, y, size)
        except Exception as err:  # codecs and tifffile raise many types for damaged tile data
            raise _damaged_tiles(self.slide.path, err, level, x0, y0, size) from err

    def _check_headers_under(self, level: int, y: int, height: int) -> None:
        """tiffslide decodes each chunk a region crosses at the size its header declares: check those headers first,
        each chunk once per reader."""
        page = self.slide._levels[level].keyframe
        if int(page.compression) not in CHUNK_HEADER_READERS:
            return  # a codec without a frame header decodes to the size the tags give, already bounded
        for index in _chunks_crossed(page, y, height):
            count = page.databytecounts[index]
            if count and (level, index) not in self._checked_chunks:
                _check_chunk_header(page, os.pread(self.slide._fd, count, page.dataoffsets[index]), index)
                self._checked_chunks.add((level, index))

    def _assemble(self, page, level: int, x: int, y: int, size: tuple[int, int]) -> np.ndarray:
        w, h = size
        width, height = self.slide.level_dimensions[level]
        tw, th = page.tilewidth, page.tilelength
        inside = x >= 0 and y >= 0 and x + w <= width and y + h <= height
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)  # outside: background
        for ty in range(max(y, 0) // th, (min(y + h, height) - 1) // th + 1):
            for tx in range(max(x, 0) // tw, (min(x + w, width) - 1) // tw + 1):
                tile = self._tile(page, level, ty, tx)
                sx0, sy0 = max(x, tx * tw), max(y, ty * th)
                sx1, sy1 = min(x + w, (tx + 1) * tw, width), min(y + h, (ty + 1) * th, height)
                if sx1 > sx0 and sy1 > sy0:
                    out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - ty * th : sy1 - ty * th, sx0 - tx * tw : sx1 - tx * tw]
        return out

    def _tile(self, page, level: int, ty: int, tx: int) -> np.ndarray:
        key = (level, ty, tx)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key in self._seed:
            return self._seed[key]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        index = ty * tiles_across + tx
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            tile = np.full((page.tilelength, page.tilewidth, 3), 255, np.uint8)
        else:
            data = os.pread(self.slide._fd, count, offset)
            _check_chunk_header(page, data, index)
            segment = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)[0]
            tile = np.ascontiguousarray(segment.reshape(page.tilelength, page.tilewidth, -1)[..., :3])
        self._cache[key] = tile
        self._cache_bytes += tile.nbytes + CACHE_ENTRY_BYTES
        while self._cache_bytes > TILE_CACHE_BYTES and len(self._cache) > 1:
            self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes + CACHE_ENTRY_BYTES
        return tile


def _check_chunk_header(page, data: bytes, index: int) -> None:
    """A JPEG or JPEG 2000 tile (or strip) is decoded at the size its own header declares, allocated first, before it
    is found not to fit: a few kilobytes can declare gigabytes. Refuse a declaration larger than the tags' chunk, and
    a header that cannot be read: a decoder may still find one there (libjpeg skips bytes it does not understand)."""
    read_header = CHUNK_HEADER_READERS.get(int(page.compression))
    if read_header is None:
        return
    kind = "tile" if page.is_tiled else "strip"
    codec = getattr(page.compression, "name", page.compression)
    jpegheader = getattr(page, "jpegheader", None)  # NDPI: the frame header is the file's, the chunk only its scan
    try:
        declared = read_header(data if jpegheader is None else jpegheader + data)
    except ValueError as err:
        raise ValueError(f"{kind} {index} {err}; it was not decoded") from None
    if declared > math.prod(page.chunks):
        raise ValueError(
            f"{kind} {index} declares {declared} samples (height x width x components) in its {codec} header, more than the "
            f"{' x '.join(map(str, page.chunks))} of the TIFF's {kind}s; it was not decoded"
        )


def _check_chunk_count(page, what: str, path: Path) -> None:
    """A page listing fewer tiles (or strips) than its size needs opens, and fails only where a read reaches the
    missing ones, with an IndexError of tifffile's: refused at open, with the counts."""
    listed, needed = len(page.dataoffsets), math.prod(page.chunked)
    if listed < needed:
        kind = "tile" if page.is_tiled else "strip"
        raise InputError(
            f"damaged slide: {what} lists {listed} of the {needed} {kind}s its size needs (TIFF {kind} offsets)",
            where=path,
            hint="copy the slide again from the scanner or archive, or export it again",
        )


def _chunks_crossed(page, y: int, height: int) -> range:
    """The chunks rows `y .. y + height` of `page` cross: exactly for interleaved strips (the usual layout off the
    fast path), every chunk of the page for the rarer ones (separate colour planes, tiles of several planes)."""
    if page.is_tiled or page.planarconfig != 1:
        return range(len(page.dataoffsets))
    rows = page.rowsperstrip or page.imagelength
    first, last = max(y, 0) // rows, (min(y + height, page.imagelength) - 1) // rows
    return range(first, min(last + 1, len(page.dataoffsets)))


def _tiff_pixels(series) -> str | None:
    """What is wrong with a TIFF series' pixels for an RGB brightfield reader, or None when nothing is."""
    samples = series.shape[-1] if series.axes.endswith("S") else 1
    planes = [f"{n} {axis}" for axis, n in zip(series.axes, series.shape) if axis not in "YXS" and n > 1]
    photometric = series.levels[0].keyframe.photometric
    if series.dtype == np.uint8 and samples in (3, 4) and not planes and int(photometric) in TIFF_COLOUR_PHOTOMETRICS:
        return None
    return (
        f"{series.dtype} pixels, {samples} sample(s) each, photometric {getattr(photometric, 'name', photometric)}"
        + (f", in {' x '.join(planes)} planes (channels, focal planes or time points)" if planes else "")
        + f" (axes {series.axes})"
    )


def _dicom_pixels(dataset) -> str | None:
    """What is wrong with a DICOM whole-slide level's pixels for an RGB brightfield reader, or None."""
    photometric, samples, bits = dataset.PhotometricInterpretation, dataset.SamplesPerPixel, dataset.BitsAllocated
    if photometric in DICOM_COLOUR_PHOTOMETRICS and samples == 3 and bits == 8:
        return None
    return f"{bits}-bit pixels, {samples} sample(s) each, {photometric}"


def _check_brightfield(problem: str | None, path: Path, level: int = 0) -> None:
    if problem is not None:
        raise InputError(f"not an 8-bit RGB brightfield slide: level {level} holds {problem}", where=path, hint=BRIGHTFIELD_HINT)


def _tile_size(page) -> tuple[int, int]:
    """(width, height) of a TIFF page's tiles; (0, 0) for strips."""
    return (page.tilewidth, page.tilelength) if page.is_tiled else (0, 0)


def _check_level_shapes(dimensions: list[tuple[int, int]], tile_sizes: list[tuple[int, int]], path: Path) -> None:
    """Every level is level 0 shrunk by one factor across and down: tiles are placed on a level by that factor, so a
    level of another shape would be read elsewhere than the tissue mask and the grid say, without an error. Each side
    may be off by its rounding and by padding up to a whole tile (Philips pads every level so)."""
    w0, h0 = dimensions[0]
    for level, ((w, h), (tw, th)) in enumerate(zip(dimensions, tile_sizes)):
        width_says, height_says = _factors(w0, w, tw + 2), _factors(h0, h, th + 2)
        if max(width_says[0], height_says[0]) > min(width_says[1], height_says[1]):
            raise InputError(
                f"damaged slide: level {level} ({w} x {h} pixels) is not level 0 ({w0} x {h0}) shrunk alike across "
                f"and down: level 0 is {w0 / max(w, 1):.3g} times as wide and {h0 / max(h, 1):.3g} times as high",
                where=path,
                hint="copy the slide again from the scanner or archive, or export it again",
            )


def _factors(side0: int, side: int, slack: int) -> tuple[float, float]:
    """The shrink factors a level side of `side` pixels (give or take `slack`) allows for a level-0 side of `side0`."""
    return side0 / (side + slack), (side0 / (side - slack) if side > slack else math.inf)


def _fast_path_ok(page) -> bool:
    return bool(
        page.is_tiled and page.planarconfig == 1 and page.imagedepth == 1 and page.dtype == np.uint8 and page.samplesperpixel in (3, 4)
    )


def _unreadable(path: Path, err: Exception) -> InputError:
    """Tell a damaged or truncated TIFF apart from a file that is not a TIFF at all."""
    with open(path, "rb") as f:
        header = f.read(4)
    detail = f"{type(err).__name__}: {err}"
    if header in TIFF_MAGIC and isinstance(err, NotImplementedError):  # tifffile's word for a layout it cannot tile
        return InputError(f"unsupported slide layout ({detail})", where=path, hint=BRIGHTFIELD_HINT)
    if header in TIFF_MAGIC:
        return InputError(
            f"damaged or truncated slide: the TIFF structure cannot be read ({detail}; file has {path.stat().st_size} bytes)",
            where=path,
            hint="copy the slide again from the scanner or archive",
        )
    return InputError(
        f"not a readable whole-slide image ({detail})", where=path, hint=f"expected a TIFF-based slide ({', '.join(SLIDE_SUFFIXES)})"
    )


def open_slide(path: str | Path, mpp: float | None = None) -> Slide | DicomSlide:
    """Open a slide (a TIFF-based file, or a DICOM whole-slide image's folder or one of its files);
    `mpp` overrides (or supplies missing) level-0 µm/pixel."""
    path = Path(path)
    if path.is_dir() or (path.suffix.lower() not in SLIDE_SUFFIXES and is_dicom_wsi_file(path)):
        return DicomSlide(path if path.is_dir() else path.parent, mpp=mpp)
    return Slide(path, mpp=mpp)


class DicomSlide(_Levels):
    """A DICOM whole-slide image (the folder of its series' files), read through wsidicom.
    Levels are the pyramid's, finest first; µm/pixel comes from the Pixel Spacing of the finest."""

    def __init__(self, folder: str | Path, mpp: float | None = None):
        self.path = Path(folder)
        if not self.path.is_dir():
            raise DataNotFoundError("DICOM whole-slide image folder not found", where=self.path)
        try:
            from wsidicom import WsiDicom
        except ImportError as err:
            raise InputError(
                "reading DICOM whole-slide images needs wsidicom", where=self.path, hint="pip install 'medtriage[wsi]'"
            ) from err
        headers = list(_wsi_headers(self.path))
        files = [path for path, _ in headers]
        if not files:
            raise InputError(
                "no DICOM whole-slide image files in the folder",
                where=self.path,
                hint="pass the folder holding the VL Whole Slide Microscopy Image files of one slide",
            )
        # Streams whose reads are bounded by each file's size: wsidicom reads a frame by the length its item claims. It
        # reads no deflated data set, but inflates one whole (pixels too) before leaving it out: left out here instead.
        self._files: list = []
        deflated = [path for path, header in headers if _deflated(header)]
        try:
            for path in (path for path in files if path not in deflated):
                self._files.append(open(path, "rb"))  # closed by close(), or below when the series is unreadable
            self._wsi = WsiDicom.open_streams([ClampedReader.over(file) for file in self._files])
            levels = list(self._wsi.levels)
        except Exception as err:  # wsidicom raises many types for incomplete or damaged series
            self._close_files()
            raise (self._missing_levels(files) or self._deflated_left_out(deflated) or self._unreadable_series(err)) from err
        self._structure_or_close(lambda: self._read_structure(levels, mpp), self._unreadable_series)

    def _missing_levels(self, files: list[Path]) -> InputError | None:
        """The error for a series without VOLUME images (the pyramid levels: PS3.3 C.8.12.4.1.1, Image Type value 3),
        e.g. a folder holding only a slide's label or overview: what it holds instead, and which series. None where a
        VOLUME image is there, or a header that cannot be read might be one (the series failed for another reason)."""
        flavours, series = _image_flavours(files)
        if "VOLUME" in flavours or "UNREADABLE" in flavours:
            return None
        held = ", ".join(f"{count} {flavour}" for flavour, count in sorted(flavours.items()))
        return InputError(
            f"the DICOM whole-slide image series {', '.join(sorted(series)) or '(no Series Instance UID)'} has no pyramid "
            f"levels: no VOLUME image among its {len(files)} file{'s' if len(files) != 1 else ''} (it holds {held})",
            where=self.path,
            hint="copy the slide's VOLUME image files (its scanned levels) into the folder, or export the whole slide "
            "again from the scanner or archive",
        )

    def _deflated_left_out(self, deflated: list[Path]) -> InputError | None:
        """The error for a series that cannot be read once its deflated files are left out (None: none was)."""
        if not deflated:
            return None
        names = ", ".join(printable(path.name) for path in deflated[:3]) + (", ..." if len(deflated) > 3 else "")
        return InputError(
            f"the slide cannot be read without its {len(deflated)} file(s) in Deflated Explicit VR Little Endian ({names}), "
            "a transfer syntax the whole-slide reader does not read",
            where=self.path,
            hint="export the slide again uncompressed or in a JPEG / JPEG 2000 syntax, or convert those files (dcmconv +te IN OUT)",
        )

    def _unreadable_series(self, err: Exception) -> InputError:
        return InputError(
            f"not a readable DICOM whole-slide image ({type(err).__name__}: {err})",
            where=self.path,
            hint="check that the folder holds every file of one slide's series",
        )

    def _read_structure(self, levels: list, mpp: float | None) -> None:
        for number, level in enumerate(levels):
            _check_brightfield(_dicom_pixels(level.datasets[0]), self.path, number)
        self._pyramid_levels = [level.level for level in levels]  # wsidicom's level numbers (log2 of the scale)
        self.level_dimensions = [(int(level.size.width), int(level.size.height)) for level in levels]
        self.dimensions = self.level_dimensions[0]
        self._tile_sizes = [(int(level.tile_size.width), int(level.tile_size.height)) for level in levels]
        _check_level_shapes(self.level_dimensions, self._tile_sizes, self.path)
        self.level_downsamples = [self.dimensions[0] / w for w, _ in self.level_dimensions]
        self._check_tile_sizes()
        self._frame_headers = [FRAME_HEADER_READERS.get(str(level.default_instance.image_data.transfer_syntax)) for level in levels]
        spacing = levels[0].mpp  # µm/pixel, absent when the files carry no Pixel Spacing
        if mpp is not None:
            self.mpp = _checked_mpp(mpp, self.path)
        elif spacing and spacing.width:
            self.mpp = _plausible_mpp(float(spacing.width), self.path, "the slide's Pixel Spacing")
        else:
            raise InputError("no resolution metadata (µm/pixel) in the slide", where=self.path, hint=MPP_HINT)
        self.shared_reader = _DicomRegionReader(self)

    def _check_tile_sizes(self) -> None:
        """A frame is decoded whole at the size Rows and Columns give (its header may claim no more): a few kilobytes can
        claim gigabytes. Refused before anything is decoded, with the limit of a TIFF slide's tiles."""
        for level, (width, height) in enumerate(self._tile_sizes):
            if width * height * 3 > MAX_CHUNK_BYTES:
                raise InputError(
                    f"level {level} is stored in tiles (frames) of {height} x {width} x 3 samples ({width * height * 3} bytes "
                    f"each when decoded), over the limit of {MAX_CHUNK_BYTES} bytes",
                    where=self.path,
                    hint="export the slide again as a DICOM whole-slide image with tiles of at most a few thousand pixels",
                )

    def reader(self) -> _DicomRegionReader:
        return _DicomRegionReader(self)

    def scanner_thumbnail(self) -> Image.Image | None:
        return None  # the pyramid's coarsest level serves instead

    def close(self) -> None:
        """Close wsidicom's series, then the files under it, whatever the first does: a failing close must not leave
        the file handles open (a server opening slides for days would run out of them)."""
        try:
            self._wsi.close()
        except Exception as err:
            raise InputError(
                f"closing the DICOM whole-slide image failed ({type(err).__name__}: {err}); its files were closed",
                where=self.path,
                hint="nothing to do for this slide; report it if it recurs",
            ) from err
        finally:
            self._close_files()

    def _close_files(self) -> None:
        for file in self._files:
            file.close()


def _image_flavours(files: list[Path]) -> tuple[dict[str, int], set[str]]:
    """How many of `files` hold each image flavour (Image Type value 3: VOLUME, LABEL, OVERVIEW, THUMBNAIL), and
    the Series Instance UIDs they name. Headers that cannot be read count as UNREADABLE."""
    flavours: dict[str, int] = {}
    series: set[str] = set()
    for path in files:
        try:
            header = _header(path, ["ImageType", "SeriesInstanceUID"])
            image_type = list(header.get("ImageType") or [])
            flavour = printable(str(image_type[2]).upper()) if len(image_type) > 2 else "UNTYPED"
            if header.get("SeriesInstanceUID"):
                series.add(printable(str(header.SeriesInstanceUID)))
        except Exception:  # a damaged header: counted, not fatal to the message
            flavour = "UNREADABLE"
        flavours[flavour] = flavours.get(flavour, 0) + 1
    return flavours, series


class _DicomRegionReader:
    def __init__(self, slide: DicomSlide):
        self.slide = slide
        self._checked_frames: set[tuple[int, int, int]] = set()  # (level, tile column, tile row) whose header fits

    def read(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
        return white_beyond_edge(self.slide, self._read_inside, x0, y0, level, size)

    def _read_inside(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = self.slide.level_position(x0, y0, level)  # wsidicom takes the level's own pixel coordinates
        try:
            self._check_frames_under(level, x, y, size)
            region = self.slide._wsi.read_region((x, y), self.slide._pyramid_levels[level], tuple(int(v) for v in size))
            return np.asarray(region.convert("RGB"), dtype=np.uint8)
        except Exception as err:  # wsidicom, pydicom and the codecs raise many types for damaged frames
            raise _damaged_tiles(self.slide.path, err, level, x0, y0, size) from err

    def _check_frames_under(self, level: int, x: int, y: int, size: tuple[int, int]) -> None:
        """wsidicom decodes each frame a region crosses at the size its JPEG or JPEG 2000 header declares, allocated
        first and cropped to the tile after: check those headers first, each frame once per reader."""
        read_header = self.slide._frame_headers[level]
        if read_header is None:
            return  # a frame without a codestream header decodes to the size the tags give
        (tw, th), (width, height) = self.slide._tile_sizes[level], self.slide.level_dimensions[level]
        for row in range(max(y, 0) // th, (min(y + size[1], height) - 1) // th + 1):
            for col in range(max(x, 0) // tw, (min(x + size[0], width) - 1) // tw + 1):
                if (level, col, row) not in self._checked_frames:
                    pyramid_level = self.slide._pyramid_levels[level]
                    data = self.slide._wsi.read_encoded_tile(pyramid_level, (col, row), crop_to_image_boundary=False)
                    _check_frame_header(read_header, data, (col, row), (tw, th))
                    self._checked_frames.add((level, col, row))


def _check_frame_header(read_header, data: bytes, tile: tuple[int, int], tile_size: tuple[int, int]) -> None:
    """The DICOM counterpart of `_check_chunk_header`: a frame may declare no more samples than an RGB tile holds."""
    try:
        declared = read_header(data)
    except ValueError as err:
        raise ValueError(f"the frame of tile {tile} {err}; it was not decoded") from None
    if declared > tile_size[0] * tile_size[1] * 3:
        raise ValueError(
            f"the frame of tile {tile} declares {declared} samples (height x width x components) in its header, more than "
            f"the {tile_size[1]} x {tile_size[0]} x 3 of the slide's tiles; it was not decoded"
        )


def white_beyond_edge(slide, read_inside, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
    """`read_inside` of the region's part inside the level, and white glass beyond its right and bottom edges:
    only that part is read, as readers differ beyond the edge (black, white or an error)."""
    x, y = slide.level_position(x0, y0, level)
    width, height = slide.level_dimensions[level]
    w, h = size
    inside_w, inside_h = min(w, width - x), min(h, height - y)
    if (inside_w, inside_h) == (w, h):
        return read_inside(x0, y0, level, size)
    out = np.full((h, w, 3), 255, np.uint8)
    if inside_w > 0 and inside_h > 0:
        out[:inside_h, :inside_w] = read_inside(x0, y0, level, (inside_w, inside_h))
    return out


def _damaged_tiles(path: Path, err: Exception, level: int, x0: int, y0: int, size: tuple[int, int]) -> InputError:
    """Where in the slide: a lab checks the scan there, or rescans."""
    return InputError(
        f"cannot decode slide tile data of level {level}, in the {size[0]} x {size[1]} pixel region at level-0 pixel "
        f"({x0}, {y0}) ({type(err).__name__}: {err})",
        where=path,
        hint="the file may be damaged: copy it again from the scanner or archive, or rescan the slide",
    )
