"""Whole-slide images to model tiles: tissue mask, tile grid at a physical resolution, tile batches.

numpy + PIL only (reading is `medtriage.io.slide_reader`). Coordinates are level-0 pixels `(x, y)`
of a tile's top-left corner. The grid is laid out in µm/pixel, not pyramid levels, so slides
scanned at 20x and 40x give the same physical tiles. The last column and row may run past the
slide's right and bottom edges: that part reads as white glass and counts as background.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from medtriage.errors import ConfigError, InputError
from medtriage.io.slide_reader import MAX_MPP, MIN_MPP, SLIDE_SUFFIXES, RegionReader, Slide, is_slide_path, open_slide, within_mpp_limits  # noqa: F401 (re-exported)
from medtriage.io.stain import REFERENCE_STAINS, StainNormalizer, Stains, fit_stains

DEFAULT_TILE_MPP = 0.5  # 20x
MASK_MPP = 8.0  # tissue mask resolution, µm/pixel
MIN_SATURATION = 0.07  # Otsu floor: a blank slide has no threshold worth splitting on
# Brightest channel (uint8) below which a mask pixel is black, not tissue: outside the scanned area, a scan without
# light, ink. Stained tissue passes light (under 10% in every channel is an optical density above 1 in all three, darker
# than dense nuclei averaged over a mask pixel); the sensor noise on black differs by a few codes between channels,
# which reads as a high saturation.
BLACK_BELOW = 25
MOSTLY_BLACK = 0.5  # share of the slide's image that is black for a slide without tissue to be called black
COARSER_TOLERANCE = 1.1  # read a slide up to 10% coarser than asked before refusing
STAIN_FIT_TILES = 16  # tiles sampled across the slide to fit its stains
READ_AHEAD_PER_WORKER = 2  # tile batches loaded ahead of the consumer, per worker thread


# --- tissue mask ---------------------------------------------------------------------------


@dataclass
class TissueMask:
    """Boolean tissue mask; one mask pixel covers `downsample` level-0 pixels across and `row_downsample` down (the
    image it thresholds, a scanner's thumbnail say, can be up to 1% off the slide's aspect; None: `downsample`)."""

    mask: np.ndarray
    downsample: float
    threshold: float
    black_fraction: float = 0.0  # share of the image thresholded that was black (never tissue)
    row_downsample: float | None = None

    def __post_init__(self) -> None:
        if self.row_downsample is None:
            self.row_downsample = self.downsample

    def fractions(self, xs: list[int], ys: list[int], size0: float) -> np.ndarray:
        """`[len(ys), len(xs)]` tissue fractions of the level-0 squares at every (x, y) pair, from one integral image."""
        rows = self._cells(ys, size0, self.row_downsample, self.mask.shape[0])
        cols = self._cells(xs, size0, self.downsample, self.mask.shape[1])
        integral = self.integral_image()
        (r0, r1), (c0, c1) = rows[:, :, None], cols[:, None, :]
        area = (r1 - r0) * (c1 - c0)
        # Left to right every partial result lies in [-n, n] for n mask pixels, so the integral's dtype holds it too.
        tissue = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        return np.where(area > 0, tissue / np.maximum(area, 1), 0.0)

    def integral_image(self) -> np.ndarray:
        """`[h + 1, w + 1]` counts of tissue pixels above and left of each corner, summed in place: the only array the
        size of the mask is the result, 4 bytes a pixel (int64 cumsums and their temporaries took 24)."""
        h, w = self.mask.shape
        integral = np.zeros((h + 1, w + 1), integral_dtype(self.mask.size))
        for row in range(h):  # row by row: whole-array cumsums make temporaries the size of the mask
            np.cumsum(self.mask[row], dtype=integral.dtype, out=integral[row + 1, 1:])
            integral[row + 1] += integral[row]
        return integral

    @staticmethod
    def _cells(starts: list[int], size0: float, d: float, limit: int) -> np.ndarray:
        """`[2, n]` first and end mask cells covered by each level-0 span (at least one cell, clipped to the mask)."""
        first = [int(v / d) for v in starts]
        end = [max(int(np.ceil((v + size0) / d)), f + 1) for v, f in zip(starts, first)]
        return np.clip(np.array([first, end], np.int64), 0, limit)


def integral_dtype(n_pixels: int) -> type[np.integer]:
    """int32 when counts of up to `n_pixels` fit it, else int64: int32 for any mask `tissue_mask` makes
    (the image it thresholds is capped at MAX_WHOLE_IMAGE_BYTES / 3 pixels, far below 2**31)."""
    return np.int32 if n_pixels <= np.iinfo(np.int32).max else np.int64


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of uint8 RGB `[h, w, 3]`: stained tissue is coloured, glass is grey."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # channel-wise max/min: a reduction over 3 is slow
    high = np.maximum(np.maximum(red, green), blue).astype(np.float32)
    low = np.minimum(np.minimum(red, green), blue).astype(np.float32)
    return np.where(high > 0, (high - low) / np.maximum(high, 1), 0.0).astype(np.float32)


def black(rgb: np.ndarray) -> np.ndarray:
    """Pixels of uint8 RGB `[h, w, 3]` with no channel reaching BLACK_BELOW."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) < BLACK_BELOW


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def low_resolution_image(slide: Slide, mpp: float) -> tuple[Image.Image, float]:
    """An image of the whole slide at `mpp` or finer, and its µm/pixel.

    The scanner's thumbnail when it is fine enough (and its shape matches the slide), else the coarsest pyramid level
    fine enough, shrunk to `mpp`: block by block when that level is large (`Slide.level_image`), so a slide without a
    coarse level is never decoded whole for its mask.
    """
    level = slide.finest_level_for(mpp)
    thumbnail = slide.scanner_thumbnail()
    if thumbnail is not None:
        thumb_mpp = slide.mpp * slide.dimensions[0] / thumbnail.width
        if slide.level_mpp(level) < thumb_mpp <= mpp * 1.01:
            return thumbnail, thumb_mpp
    image = slide.level_image(level, min(1.0, slide.level_mpp(level) / mpp))
    return image, slide.mpp * slide.dimensions[0] / image.width


def tissue_threshold(sat: np.ndarray, min_saturation: float = MIN_SATURATION) -> float:
    """Otsu's split of glass from tissue, floored so blank glass stays background. A slide covered in tissue has no
    glass to split off, and Otsu would split the tissue itself (pale from dark, dropping the pale): when what falls
    below its threshold is mostly not glass (median saturation above the floor), the floor alone decides."""
    threshold = otsu_threshold(sat)
    below = sat[sat <= threshold]
    if below.size and float(np.median(below)) > min_saturation:
        return min_saturation
    return max(threshold, min_saturation)


def tissue_mask(slide: Slide, mask_mpp: float = MASK_MPP, min_saturation: float = MIN_SATURATION) -> TissueMask:
    """Tissue where the saturation at low resolution is above `tissue_threshold`; black is never tissue."""
    image, image_mpp = low_resolution_image(slide, mask_mpp)
    scale = image_mpp / mask_mpp
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BOX)
    rgb = np.asarray(image)
    sat, dark = saturation(rgb), black(rgb)
    sat[dark] = 0.0  # glass to the threshold: the noise on black is saturated
    threshold = tissue_threshold(sat, min_saturation)
    mask = Image.fromarray(((sat > threshold) * 255).astype(np.uint8)).filter(ImageFilter.MedianFilter(3))
    return TissueMask(
        np.asarray(mask) > 0,
        downsample=slide.dimensions[0] / image.width,
        threshold=threshold,
        black_fraction=float(dark.mean()),
        row_downsample=slide.dimensions[1] / image.height,
    )


# --- tile grid -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    x: int  # level-0 pixel of the top-left corner
    y: int
    tissue_fraction: float


@dataclass
class TileGrid:
    """Tiles of `tile_size` pixels at `mpp` µm/pixel, read from `level` as `read_size` pixels."""

    tile_size: int
    mpp: float
    level: int
    read_size: int
    size0: float  # tile side in level-0 pixels
    tiles: list[Tile] = field(default_factory=list)
    n_candidates: int = 0  # grid positions before background was skipped

    @property
    def n_background(self) -> int:
        return self.n_candidates - len(self.tiles)


def tile_grid(
    slide: Slide, tile_size: int = 224, mpp: float = DEFAULT_TILE_MPP, mask: TissueMask | None = None, min_tissue: float = 0.5
) -> TileGrid:
    """Non-overlapping grid of physical tiles covering the whole slide; positions with less tissue than `min_tissue`
    are skipped (the part of an edge tile beyond the slide counts as background)."""
    if not (tile_size >= 1 and within_mpp_limits(mpp)):
        raise ConfigError(
            f"tiles of {tile_size} pixels at {mpp:.4g} µm/pixel",
            hint=f"the tile size must be positive and µm/pixel from {MIN_MPP:g} to {MAX_MPP:g}: check the package's pathology block",
        )
    if slide.mpp > mpp * COARSER_TOLERANCE:
        raise InputError(
            f"slide scanned at {slide.mpp:.4g} µm/pixel is coarser than the {mpp:.4g} µm/pixel the tiles need",
            where=slide.path,
            hint="use a model trained at a coarser resolution, or rescan at higher magnification",
        )
    mask = mask if mask is not None else tissue_mask(slide)
    size0 = tile_size * mpp / slide.mpp
    level = slide.finest_level_for(mpp)
    grid = TileGrid(tile_size, mpp, level, max(1, round(size0 / slide.level_downsamples[level])), size0)
    w0, h0 = slide.dimensions
    # Partial tiles at the right and bottom edges too: tissue there would otherwise never be scored.
    xs = [round(col * size0) for col in range(math.ceil(w0 / size0))]
    ys = [round(row * size0) for row in range(math.ceil(h0 / size0))]
    fractions = mask.fractions(xs, ys, size0) * np.outer(_inside_share(ys, size0, h0), _inside_share(xs, size0, w0))
    grid.n_candidates = fractions.size
    for row, col in zip(*np.nonzero(fractions >= min_tissue)):  # row-major: the grid order
        grid.tiles.append(Tile(xs[col], ys[row], round(float(fractions[row, col]), 4)))
    return grid


def _inside_share(starts: list[int], size0: float, limit: int) -> np.ndarray:
    """Share of each level-0 span `[start, start + size0)` that lies inside `[0, limit)`."""
    return np.clip((limit - np.asarray(starts, np.float64)) / size0, 0.0, 1.0)


def read_tile_rgb(reader: RegionReader, grid: TileGrid, tile: Tile) -> np.ndarray:
    """A tile as uint8 RGB `[tile_size, tile_size, 3]`, resampled to the grid's µm/pixel when needed."""
    rgb = reader.read(tile.x, tile.y, grid.level, (grid.read_size, grid.read_size))  # white beyond the edge
    if grid.read_size != grid.tile_size:
        rgb = np.asarray(Image.fromarray(rgb).resize((grid.tile_size, grid.tile_size), Image.Resampling.BILINEAR, reducing_gap=2.0))
    return rgb


def read_tile(
    reader: RegionReader, grid: TileGrid, tile: Tile, normalizer: StainNormalizer | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Decoded (and optionally stain-normalised) tile as float32 `[3, S, S]` in [0, 1]: the model's input.

    `out`: a C-contiguous float32 `[3, S, S]` to fill (e.g. one slot of a batch) instead of a new array.
    """
    rgb = read_tile_rgb(reader, grid, tile)
    if normalizer is not None:
        return normalizer.from_rgb(rgb, out=out)
    return np.divide(rgb.transpose(2, 0, 1), np.float32(255.0), out=out, dtype=np.float32)


def grid_overview(slide: Slide, grid: TileGrid, mask: TissueMask, max_side: int = 800) -> Image.Image:
    """Thumbnail with the tissue mask tinted green and kept tiles outlined: a picture to check tiling by eye."""
    from PIL import ImageDraw

    thumb = Image.fromarray(slide.thumbnail(max_side)).convert("RGB")
    tint = Image.new("RGB", thumb.size, (0, 200, 0))
    mask_img = Image.fromarray((mask.mask * 70).astype(np.uint8)).resize(thumb.size, Image.Resampling.NEAREST)
    overview = Image.composite(tint, thumb, mask_img)
    # each axis its own scale: each side of the thumbnail is rounded on its own (serve.slides.render_heatmap)
    sx, sy = thumb.width / slide.dimensions[0], thumb.height / slide.dimensions[1]
    draw = ImageDraw.Draw(overview)
    for tile in grid.tiles:
        x, y = tile.x * sx, tile.y * sy
        draw.rectangle([x, y, x + grid.size0 * sx, y + grid.size0 * sy], outline=(0, 0, 0), width=2)
    return overview


# --- whole-slide pipeline: open, mask, grid, fit stains, then stream tile batches -------------


@dataclass
class PreparedSlide:
    slide: Slide
    mask: TissueMask
    grid: TileGrid
    normalizer: StainNormalizer | None = None


def prepare_slide(
    path: str | Path,
    tile_size: int = 224,
    mpp: float = DEFAULT_TILE_MPP,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
    stain_normalize: bool = False,
    target_stains: Stains = REFERENCE_STAINS,
) -> PreparedSlide:
    """Everything before the tiles: a slide without tissue is refused here, with the counts. A slide refused after
    it was opened is closed (its file handles would otherwise stay open for the life of a server)."""
    slide = open_slide(path, mpp=slide_mpp)
    try:
        return _prepare_open_slide(slide, path, tile_size, mpp, min_tissue, stain_normalize, target_stains)
    except BaseException:
        slide.close()
        raise


def _prepare_open_slide(
    slide: Slide, path: str | Path, tile_size: int, mpp: float, min_tissue: float, stain_normalize: bool, target_stains: Stains
) -> PreparedSlide:
    mask = tissue_mask(slide)
    grid = tile_grid(slide, tile_size, mpp, mask, min_tissue)
    if not grid.tiles:
        raise _no_tissue(mask, grid, min_tissue, path)
    prepared = PreparedSlide(slide, mask, grid)
    if stain_normalize:
        sample = grid.tiles[:: max(1, len(grid.tiles) // STAIN_FIT_TILES)][:STAIN_FIT_TILES]
        source = fit_stains([read_tile_rgb(slide.shared_reader, grid, t) for t in sample], where=str(path))
        prepared.normalizer = StainNormalizer(source, target_stains)
    return prepared


def _no_tissue(mask: TissueMask, grid: TileGrid, min_tissue: float, path: str | Path) -> InputError:
    what = f"no tissue found: none of {grid.n_candidates} tile positions has {min_tissue:.0%} tissue"
    if mask.black_fraction >= MOSTLY_BLACK:
        return InputError(
            f"{what}; {mask.black_fraction:.0%} of the slide is black (no colour channel reaching {BLACK_BELOW} of 255)",
            where=path,
            hint="the scan saw no light, or the slide is not a brightfield (H&E, IHC) slide: rescan it",
        )
    return InputError(
        f"{what} (saturation threshold {mask.threshold:.3f})",
        where=path,
        hint="check that the slide is stained and in focus, or lower the minimum tissue fraction",
    )


def iter_tile_batches(prepared: PreparedSlide, batch_size: int = 32, workers: int = 1) -> Iterator[tuple[list[Tile], np.ndarray]]:
    """(tiles, float32 `[B, 3, S, S]`) in grid order; `workers` threads read and normalise batches."""
    tiles = prepared.grid.tiles
    batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]
    local = threading.local()

    def load(batch: list[Tile]) -> tuple[list[Tile], np.ndarray]:
        if not hasattr(local, "reader"):  # tile caches are not thread-safe: one per thread
            local.reader = prepared.slide.shared_reader if workers <= 1 else prepared.slide.reader()
        size = prepared.grid.tile_size
        pixels = np.empty((len(batch), 3, size, size), np.float32)
        for tile, out in zip(batch, pixels):
            read_tile(local.reader, prepared.grid, tile, prepared.normalizer, out=out)
        return batch, pixels

    if workers <= 1:
        yield from map(load, batches)
        return
    # A few batches ahead of the consumer, never the whole slide: the model is slower than the readers, and a large
    # slide's batches would all wait in memory (Executor.map submits every one at once).
    pending: deque = deque()
    pool = ThreadPoolExecutor(workers)
    try:
        for batch in batches:
            pending.append(pool.submit(load, batch))
            if len(pending) > READ_AHEAD_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)
