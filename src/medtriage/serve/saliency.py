"""Where the model looked: occlusion sensitivity through the served ONNX session, and a PNG overlay.

numpy + PIL + the served predictor (no torch). A grey patch (the image mean) is slid over a grid;
the occluded copies go through the model in runs of at most FRAME_BATCH images, as scoring's do, and a
cell's value is how much hiding it lowers the probability of the positive label. Cells whose occlusion
raises the probability (or lowers its log-odds by less than MIN_LOGIT_DROP) count as zero: the map shows
evidence *for* the finding. A 7 x 7 grid costs 49 occlusions plus the unoccluded image, in 4 runs. The
image is first resized to the model's input size (the graph does that anyway), so the cost does not grow
with the image; each run's copies are built only when it runs, so a model with a large input (1024 px,
3 channels: 12 MB a copy) holds one run of them, not 50, however many requests draw maps at once.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medtriage.errors import InputError, PackageError
from medtriage.io.dicom import read_dicom
from medtriage.io.safe_output import output_path, write_atomic
from medtriage.serve.predictor import FRAME_BATCH, Predictor, Score, to_model_channels

Predict = Callable[[np.ndarray], np.ndarray]  # float32 [B, C, H, W] -> probabilities [B, classes]
DEFAULT_GRID = 7
DISPLAY_SIDE = 512  # longest side of an overlay picture: the 7 x 7 map needs no more; the PACS has the full image
# A cell whose occlusion lowers the log-odds of the finding by less than this is rounding or no evidence: normalised to
# the map's peak it would paint a flat image in full heat. Log-odds, not probability: for a confident finding
# (p = 0.999999) occlusion moves p only in the sixth decimal, yet that is real evidence and must show.
MIN_LOGIT_DROP = 1e-3
# Heat map colours, yellow (low) -> orange -> red (high); low values are also nearly transparent.
HEAT_STOPS = np.array([[255, 240, 60], [255, 190, 0], [255, 120, 0], [240, 50, 0], [215, 0, 20]], np.float32)


@dataclass
class Saliency:
    map: np.ndarray  # float32 [H, W] in [0, 1]: 1 = the region whose occlusion lowered p the most
    baseline: float  # probability of the positive label on the unoccluded (working-size) image
    max_drop: float  # largest drop in that probability over the grid (0 when nothing lowered it)
    grid: int
    work_size: int | None

    def describe(self) -> dict:
        return {
            "method": "occlusion",
            "grid": self.grid,
            "work_size": self.work_size,
            "baseline": round(self.baseline, 6),
            "max_drop": round(self.max_drop, 6),
        }


def occlusion_saliency(
    predict: Predict,
    image: np.ndarray,
    positive: int,
    grid: int = DEFAULT_GRID,
    work_size: int | None = None,
    batch: int = FRAME_BATCH,
    out_size: tuple[int, int] | None = None,
) -> Saliency:
    """Occlusion map of one image `[C, H, W]` (float32 in [0, 1]) for class `positive`, at the image's size
    (or `out_size` = (H, W): a copy of the image at another scale, e.g. the one it is shown at).

    `work_size` resizes the image to work_size x work_size first (the model's own input size is
    a good choice: the graph resizes to it anyway, and the occluded copies stay small). `batch` images go
    through `predict` per run.
    Raises PackageError where the model returns a NaN or infinite probability for any copy: a map with holes
    where it did would look like a map of evidence.
    """
    image = _check_image(image)
    height, width = out_size or image.shape[1:]
    work = resize_chw(image, (work_size, work_size)) if work_size else image
    probabilities = _predict_occluded(predict, work, grid, batch)
    _require_finite(probabilities)
    probabilities = probabilities[:, positive]
    drops = np.clip(probabilities[0] - probabilities[1:], 0, None).reshape(grid, grid)
    logit_drops = (_logit(probabilities[0]) - _logit(probabilities[1:])).reshape(grid, grid)
    evidence = np.where(logit_drops >= MIN_LOGIT_DROP, drops, 0)
    smooth = upsample(evidence.astype(np.float32), height, width)
    peak = float(smooth.max())
    saliency = smooth / peak if peak > 0 else smooth  # normalised after upsampling, so the map reaches 1
    return Saliency(saliency, float(probabilities[0]), float(drops.max()), grid, work_size)


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)  # float32 1.0 is "at least 1 - 6e-8": finite, ordered
    return np.log(p) - np.log1p(-p)


def occluded_copies(image: np.ndarray, grid: int) -> np.ndarray:
    """`grid * grid` copies of `[C, H, W]`, copy k with cell (k // grid, k % grid) set to the image mean."""
    return _occlude(image, _occlusion_cells(image, grid), _fill(image))


def _occlusion_cells(image: np.ndarray, grid: int) -> list[tuple[slice, slice]]:
    """The (rows, columns) of each cell of a `grid` x `grid` grid over `[C, H, W]`, row by row."""
    if grid < 2:
        raise InputError(f"occlusion grid must be at least 2 x 2, got {grid}", hint="use a grid of 5 to 8")
    height, width = image.shape[1:]
    if height < grid or width < grid:
        raise InputError(
            f"image of {height}x{width} pixels is smaller than the {grid}x{grid} occlusion grid",
            hint="no map of where the model looked can be drawn for an image this small; its score does not need one",
        )
    rows, cols = np.linspace(0, height, grid + 1).round().astype(int), np.linspace(0, width, grid + 1).round().astype(int)
    return [(slice(rows[r], rows[r + 1]), slice(cols[c], cols[c + 1])) for r in range(grid) for c in range(grid)]


def _fill(image: np.ndarray) -> np.ndarray:
    """The grey an occluded cell is painted: the image mean, per channel."""
    return image.mean(axis=(1, 2), keepdims=True)


def _occlude(image: np.ndarray, cells: list[tuple[slice, slice] | None], fill: np.ndarray) -> np.ndarray:
    """One copy of `[C, H, W]` per cell, that cell set to `fill` (None: the image as it is)."""
    copies = np.repeat(image[None], len(cells), axis=0)
    for copy, cell in zip(copies, cells):
        if cell is not None:
            copy[:, cell[0], cell[1]] = fill
    return copies


def _predict_occluded(predict: Predict, image: np.ndarray, grid: int, batch: int) -> np.ndarray:
    """Probabilities of the image (row 0) and of its occluded copies (rows 1...), `batch` images per run, each run
    built only when it runs: all the copies at once would hold grid * grid images of the model's input size."""
    cells, fill = [None, *_occlusion_cells(image, grid)], _fill(image)
    # each run's copies are a temporary, freed when `predict` returns: one run is held, never two
    return np.concatenate([np.asarray(predict(_occlude(image, cells[i : i + batch], fill))) for i in range(0, len(cells), batch)])


def _require_finite(probabilities: np.ndarray) -> None:
    """NaN compares false with every threshold, so its cell would be drawn as "no evidence", silently."""
    bad = ~np.isfinite(probabilities).all(axis=1)
    if bad.any():
        which = "the unoccluded image" if bad[0] else f"{int(bad[1:].sum())} of its {len(bad) - 1} occluded copies"
        raise PackageError(
            f"the model returned a NaN or infinite probability for {which}: no map of where it looked can be drawn",
            hint="the score stands; have the image read without the picture, and report it to whoever maintains the model package",
        )


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise InputError(f"saliency takes one image [C, H, W], got an array of shape {image.shape}", hint="pass one frame: pixels[frame]")
    return image


def resize_chw(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`[C, H, W]` float32 resized to `size` = (H, W), antialiased (PIL's bilinear filter widens when shrinking).
    One plane at a time: PIL copies each plane it is given, and all of a large colour frame's at once add a frame."""
    height, width = size
    resized = np.empty((len(image), height, width), np.float32)
    for channel, plane in enumerate(image):
        resized[channel] = _resize_plane(plane, width, height)  # this plane's PIL copies are gone before the next's
    return resized


def _resize_plane(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize((width, height), Image.BILINEAR))


def upsample(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """A coarse `[g, g]` map to `[height, width]`, bilinear between cell centres."""
    return np.clip(resize_chw(cells[None], (height, width))[0], 0, None)


# --- the picture ---------------------------------------------------------------------------------


def overlay_image(pixels: np.ndarray, saliency: np.ndarray, alpha: float = 0.6, max_side: int = DISPLAY_SIDE) -> Image.Image:
    """The image in grey with the saliency map in warm colours on top (clear where saliency is low)."""
    grey = to_grey(pixels)
    if saliency.shape != grey.shape:
        raise InputError(f"saliency map {saliency.shape} does not match the image {grey.shape}")
    scale = min(1.0, max_side / max(grey.shape))
    if scale < 1.0:
        size = (max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
        grey, saliency = resize_chw(grey[None], size)[0], resize_chw(saliency[None], size)[0]
    base = Image.fromarray((np.clip(grey, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    heat = Image.fromarray(heat_colours(saliency))
    opacity = Image.fromarray((np.clip(saliency, 0, 1) * alpha * 255).round().astype(np.uint8))
    return Image.composite(heat, base, opacity)


def overlay_png(pixels: np.ndarray, saliency: np.ndarray, alpha: float = 0.6, max_side: int = DISPLAY_SIDE) -> bytes:
    """PNG bytes of `overlay_image` (pixels `[C, H, W]` or `[H, W]` in [0, 1]; saliency `[H, W]`)."""
    buffer = io.BytesIO()
    overlay_image(pixels, saliency, alpha, max_side).save(buffer, format="PNG", compress_level=3)  # fast, ~as small
    return buffer.getvalue()


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """`[H, W]`, `[1, H, W]` or RGB `[3, H, W]` -> `[H, W]` luminance (ITU-R BT.601)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[0] == 1:
        return pixels[0]
    if pixels.ndim == 3 and pixels.shape[0] == 3:
        return np.einsum("chw,c->hw", pixels, np.array([0.299, 0.587, 0.114], np.float32))
    raise InputError(f"cannot show an image of shape {pixels.shape}", hint="pass [H, W], [1, H, W] or [3, H, W]")


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along HEAT_STOPS."""
    position = np.clip(values, 0, 1) * (len(HEAT_STOPS) - 1)
    low = np.floor(position).astype(int).clip(0, len(HEAT_STOPS) - 2)
    frac = (position - low)[..., None]
    return (HEAT_STOPS[low] * (1 - frac) + HEAT_STOPS[low + 1] * frac).round().astype(np.uint8)


# --- for a served model ----------------------------------------------------------------------------


def model_input_size(meta: dict) -> int | None:
    """The square size the graph resizes to (model.json preprocessing.resize.size), if recorded."""
    size = meta.get("preprocessing", {}).get("resize", {}).get("size")
    return int(size) if isinstance(size, (int, float)) and size > 0 else None


def shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """`[C, H, W]` scaled down so its longest side is at most `max_side` (never enlarged)."""
    scale = max_side / max(image.shape[1:])
    if scale >= 1.0:
        return image
    return resize_chw(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale))))


def explain_frame(predictor: Predictor, frame: np.ndarray, max_side: int = DISPLAY_SIDE) -> tuple[Saliency, bytes]:
    """Occlusion map and overlay PNG of one decoded frame `[C, H, W]`, through the predictor's session. The model
    is shown the frame resized straight to its input size, as its graph does when scoring (not the display copy:
    with an input side over `max_side`, that would explain a blurred image the model never scored)."""
    frame, channels, size = np.asarray(frame, np.float32), predictor.package.channels, model_input_size(predictor.package.meta)
    pixels = to_model_channels(shrink(frame, max_side)[None], channels)[0]
    # resized before the channel conversion, which then runs on a model-sized copy, never on a huge frame
    seen = pixels if size is None else to_model_channels(resize_chw(frame, (size, size))[None], channels)[0]
    result = occlusion_saliency(predictor.probabilities, seen, predictor.positive, work_size=size, out_size=pixels.shape[1:])
    return result, overlay_png(pixels, result.map, max_side=max_side)


def write_overlay(predictor: Predictor, path: str | Path, scores: list[Score], out_dir: str | Path) -> Path:
    """`out_dir/<SOP UID>.<source digest>.overlay.png` for the most suspicious frame of one scored DICOM
    file, written atomically; the UID is sanitised (see medtriage.io.safe_output)."""
    top = max(scores, key=lambda score: score.probability)
    image = read_dicom(path, frame=None if top.frame is None else top.frame - 1)
    _, png = explain_frame(predictor, image.pixels[0])
    target = output_path(out_dir, top.sop_uid or Path(path).stem, ".overlay.png", source=Path(path).resolve())
    return write_atomic(target, png)
