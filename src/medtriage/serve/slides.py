"""Slide-level triage: score every tissue tile, aggregate to one slide score, show where.

numpy + PIL only. The tile model is any `predict(batch float32 [B, 3, S, S]) -> probabilities
[B, classes]` (the package predictor's ONNX session); tile size, µm/pixel and stain
normalisation come from the package's `pathology` block so tiles are cut as in training.

Aggregation: `mean` (diffuse findings) or `top_k` (mean of the k most suspicious tiles; a small
tumour focus is not diluted by a large normal slide).

Unusual tiles: with a package that has an OOD score, tiles above its threshold (ink, folds, tissue unlike the
training tiles) are left out of the score, the top tiles and the heatmap; a slide whose median tile is unusual is
withheld like an unusual image (scored and flagged with `allow_unusual`).

Priority: the block's `slide_thresholds`, chosen at export on validation slides aggregated the same
way; a package without them falls back to its tile thresholds (`threshold_level` says which). The slide score and
the thresholds meet as float32 values, as an image's probability and its thresholds do.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medtriage.errors import ConfigError, MedTriageError, PackageError
from medtriage.format.aggregation import AGGREGATIONS, aggregate
from medtriage.io.pathology import DEFAULT_TILE_MPP, PreparedSlide, iter_tile_batches, prepare_slide
from medtriage.io.safe_output import output_path, write_atomic
from medtriage.io.stain import REFERENCE_STAINS, Stains
from medtriage.serve.package import served_threshold
from medtriage.serve.predictor import (
    Predictor,
    Rejection,
    Score,
    decision_at,
    finding_at,
    priority_at,
    require_finite_outputs,
    to_model_channels,
)
from medtriage.serve.scope import UNUSUAL_INPUT, UnusualInputError

# Tile batch -> probabilities [B, K], or (probabilities, OOD scores [B] or None) from a graph with an OOD output.
Predict = Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class SlideSettings:
    """How tiles are cut and combined; read from a package's `pathology` block."""

    tile_size: int = 224
    tile_mpp: float = DEFAULT_TILE_MPP
    stain_normalization: str | None = None  # "macenko" or None
    target_stains: Stains = REFERENCE_STAINS
    min_tissue: float = 0.5
    aggregation: str = "top_k"
    top_k: int = 5

    @classmethod
    def from_meta(cls, pathology: dict | None) -> SlideSettings:
        block = dict(pathology or {})
        if "target_stains" in block:
            block["target_stains"] = Stains.from_dict(block["target_stains"]) if block["target_stains"] else REFERENCE_STAINS
        known = {k: v for k, v in block.items() if k in cls.__dataclass_fields__}
        settings = cls(**known)
        if settings.aggregation not in AGGREGATIONS:
            raise ConfigError(f"unknown aggregation '{settings.aggregation}'", where="pathology.aggregation", hint=f"one of {AGGREGATIONS}")
        return settings


@dataclass
class SlideResult:
    path: str
    score: float  # probability of the positive label, aggregated over tiles
    aggregation: str
    n_tiles: int
    n_background: int
    tile_mpp: float
    tile_size: int
    slide_mpp: float
    top_tiles: list[dict] = field(default_factory=list)  # x, y (level 0), size (level-0 pixels), probability
    heatmap: str | None = None
    class_means: list[float] = field(default_factory=list)  # mean tile probability per class
    n_unusual: int = 0  # tissue tiles above the OOD threshold, left out of the score
    flags: list[str] = field(default_factory=list)  # "unusual_input": withheld but scored on request
    picture: Image.Image | None = field(default=None, repr=False, compare=False)  # the heatmap, when drawn

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "picture"}


def tile_outputs(prepared: PreparedSlide, predict: Predict, batch_size: int = 32, workers: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities per tile `[N, K]` and, when `predict` gives them, OOD scores `[N]`, in grid order."""
    probs, ood = [], []
    total = -(-len(prepared.grid.tiles) // batch_size)
    # Closed on the way out, a failure included: its reader threads stop before the slide's file is closed under them.
    with closing(iter_tile_batches(prepared, batch_size=batch_size, workers=workers)) as batches:
        for _, batch in tqdm(batches, total=total, desc=prepared.slide.path.name, unit="batch", leave=False):
            out = predict(batch)
            p, o = out if isinstance(out, tuple) else (out, None)
            probs.append(np.asarray(p, dtype=np.float64).reshape(len(batch), -1))
            if o is not None:
                ood.append(np.asarray(o, dtype=np.float64).reshape(len(batch)))
    return np.concatenate(probs), np.concatenate(ood) if ood else None


def usual_tiles(n: int, ood: np.ndarray | None, threshold: float | None, allow_unusual: bool, where: str) -> tuple[np.ndarray, list[str]]:
    """Which of the `n` tiles the slide score is made of, and the slide's flags.

    The probability of a tile unlike the training tiles means nothing (and with top_k one such tile could set the
    score), so it is left out. A slide whose median tile is unusual is itself unlike the training slides: withheld,
    as an unusual image is, or with `allow_unusual` scored on all its tiles and flagged."""
    if ood is None or threshold is None:
        return np.ones(n, bool), []
    median = float(np.median(ood))
    if median > threshold:
        if not allow_unusual:
            raise UnusualInputError(median, threshold, where=where)
        return np.ones(n, bool), [UNUSUAL_INPUT]
    return ~(ood > threshold), []


def served_slide_score(tile_probabilities: np.ndarray, settings: SlideSettings) -> float:
    """The aggregate of served (float32) tile probabilities, as a float32 value like every served probability.

    Export chose the slide thresholds among float64 aggregates of float64 tile probabilities; served tiles round to
    float32, so a slide at a threshold may aggregate just below it. With both sides float32 (`served_threshold`) it
    keeps its priority, as an image does, unless float32 cannot tell its served aggregate from the threshold."""
    return float(np.float32(aggregate(tile_probabilities, settings.aggregation, settings.top_k)))


def score_slide(
    path: str | Path,
    predict: Predict,
    settings: SlideSettings = SlideSettings(),
    *,
    positive_index: int = 1,
    slide_mpp: float | None = None,
    heatmap_path: str | Path | None = None,
    heatmap: bool = False,
    batch_size: int = 32,
    workers: int = 1,
    n_top: int = 5,
    ood_threshold: float | None = None,
    allow_unusual: bool = False,
) -> SlideResult:
    """Score one slide. Bad slides raise InputError (not a slide, truncated, no tissue, no µm/pixel); a slide whose
    median tile OOD score is above `ood_threshold` raises UnusualInputError unless `allow_unusual`. With `heatmap` its
    heatmap is drawn (`picture`), with `heatmap_path` also written there."""
    prepared = prepare_slide(
        path,
        settings.tile_size,
        settings.tile_mpp,
        settings.min_tissue,
        slide_mpp=slide_mpp,
        stain_normalize=settings.stain_normalization == "macenko",
        target_stains=settings.target_stains,
    )
    with prepared.slide as slide:
        all_probs, ood = tile_outputs(prepared, predict, batch_size, workers)
        grid = prepared.grid
        tile_names = [f"{path} tile at ({tile.x}, {tile.y})" for tile in grid.tiles]
        require_finite_outputs(
            all_probs, ood, tile_names, hint="have the slide read without triage, and report it to whoever maintains the model package"
        )
        keep, flags = usual_tiles(len(all_probs), ood, ood_threshold, allow_unusual, str(path))
        all_probs, tiles = all_probs[keep], [t for t, k in zip(grid.tiles, keep) if k]
        probs = all_probs[:, positive_index]
        order = np.argsort(-probs, kind="stable")[:n_top]
        result = SlideResult(
            path=str(path),
            score=served_slide_score(probs, settings),
            aggregation=settings.aggregation,
            n_tiles=len(grid.tiles),
            n_background=grid.n_background,
            tile_mpp=grid.mpp,
            tile_size=grid.tile_size,
            slide_mpp=slide.mpp,
            class_means=[float(v) for v in all_probs.mean(axis=0)],
            top_tiles=[
                {"x": tiles[i].x, "y": tiles[i].y, "size": round(grid.size0), "probability": round(float(probs[i]), 4)} for i in order
            ],
            n_unusual=len(grid.tiles) - len(tiles),
            flags=flags,
        )
        if heatmap or heatmap_path is not None:
            result.picture = render_heatmap(prepared, probs, tiles)  # drawn while the slide is open
    if heatmap_path is not None:
        write_heatmap(result.picture, heatmap_path)
        result.heatmap = str(heatmap_path)
    return result


def write_heatmap(picture: Image.Image, path: str | Path) -> None:
    write_atomic(path, lambda f: picture.save(f, format="PNG"))


def _colormap(values: np.ndarray) -> np.ndarray:
    """Probability -> RGB: blue (0) through yellow to red (1)."""
    stops = np.array([[49, 54, 149], [116, 173, 209], [255, 255, 191], [244, 109, 67], [165, 0, 38]], np.float32)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def render_heatmap(
    prepared: PreparedSlide, probabilities: np.ndarray, tiles: list | None = None, max_side: int = 1024, opacity: float = 0.45
) -> Image.Image:
    """Probabilities of `tiles` (default: all the grid's) as coloured squares over the slide thumbnail; the rest is left clear."""
    slide, grid = prepared.slide, prepared.grid
    thumb = Image.fromarray(slide.thumbnail(max_side)).convert("RGB")
    # Each axis its own scale: each side of the thumbnail is rounded on its own, and on a long narrow slide the short
    # side's rounding, carried along the long side, would shift the squares by many pixels.
    sx, sy = thumb.width / slide.dimensions[0], thumb.height / slide.dimensions[1]
    colour = np.zeros((thumb.height, thumb.width, 3), np.uint8)
    alpha = np.zeros((thumb.height, thumb.width), np.uint8)
    for tile, p in zip(grid.tiles if tiles is None else tiles, probabilities):
        x0, y0 = int(tile.x * sx), int(tile.y * sy)
        x1, y1 = int((tile.x + grid.size0) * sx), int((tile.y + grid.size0) * sy)
        colour[y0:y1, x0:x1] = _colormap(np.float32(p))
        alpha[y0:y1, x0:x1] = int(255 * opacity)
    return Image.composite(Image.fromarray(colour), thumb, Image.fromarray(alpha))


# --- the `medtriage score` door: a slide becomes one scored row, like a DICOM file -----------------


@dataclass
class SlideScore(Score):
    """A Score for a whole slide, with the evidence: most suspicious tiles and the heatmap."""

    aggregation: str = ""
    n_tiles: int = 0
    n_background: int = 0
    n_unusual: int = 0
    tile_mpp: float = 0.0
    slide_mpp: float = 0.0
    top_tiles: list = field(default_factory=list)
    heatmap: str | None = None
    threshold_level: str = "slide"  # "slide": priority from thresholds chosen on validation slides; "tile": tile thresholds


@dataclass(frozen=True)
class SlideOperatingPoints:
    """Review/urgent thresholds on the slide score: the package's slide thresholds, else its tile thresholds."""

    review: float
    urgent: float | None
    level: str

    @classmethod
    def of(cls, package) -> SlideOperatingPoints:
        slide = package.meta["pathology"].get("slide_thresholds")
        if slide:
            urgent = served_threshold(slide["urgent"]["threshold"]) if slide.get("urgent") else None
            return cls(served_threshold(slide["review"]["threshold"]), urgent, "slide")
        return cls(package.review_threshold, package.urgent_threshold, "tile")

    def priority(self, p: float) -> str:
        return priority_at(p, self.review, self.urgent)

    def decision(self, p: float) -> str:
        return decision_at(p, self.review, self.urgent)

    def finding(self, probs: np.ndarray, positive: int, label_names: list[str]) -> str:
        return finding_at(probs, positive, label_names, self.review)


def score_slide_file(
    predictor: Predictor, path: str | Path, slide_mpp: float | None = None, heatmap_dir: str | Path | None = None
) -> SlideScore | Rejection:
    """Score one slide with a package; bad input becomes a Rejection with its reason (a batch goes on)."""
    scored, picture = slide_score_and_heatmap(predictor, path, slide_mpp, heatmap=heatmap_dir is not None)
    if picture is not None:
        save_heatmap(scored, picture, heatmap_dir, path)
    return scored


def slide_score_and_heatmap(
    predictor: Predictor, path: str | Path, slide_mpp: float | None = None, heatmap: bool = False
) -> tuple[SlideScore | Rejection, Image.Image | None]:
    """A slide's score (or its Rejection) and, with `heatmap`, its heatmap drawn but not yet written: a caller that
    must write it and report the row as one step (a stop between the two would leave a file no row names) does so."""
    try:
        result = _score_slide(predictor, Path(path), slide_mpp, heatmap)
    except MedTriageError as err:
        return Rejection.of(str(path), err), None
    return _slide_score(predictor.package, result, predictor.positive), result.picture


def save_heatmap(scored: SlideScore, picture: Image.Image, heatmap_dir: str | Path, path: str | Path) -> None:
    """Write a slide's heatmap into `heatmap_dir` and name it in its score. Named like the SR and overlay writers:
    sanitised, with a digest of the source path so two slides never collide."""
    target = output_path(heatmap_dir, Path(path).stem, ".heatmap.png", source=str(Path(path).resolve()))
    write_heatmap(picture, target)
    scored.heatmap = str(target)


def _score_slide(predictor: Predictor, path: Path, slide_mpp: float | None, heatmap: bool) -> SlideResult:
    package = predictor.package
    if "pathology" not in package.meta:
        raise PackageError(
            "this model was not trained on slide tiles: model.json has no `pathology` block (tile_size, tile_mpp)",
            where=package.directory,
            hint="score slides with a pathology model package",
        )

    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return predictor.outputs(to_model_channels(batch, package.channels, str(path)))

    return score_slide(
        path,
        predict,
        SlideSettings.from_meta(package.meta["pathology"]),
        positive_index=predictor.positive,
        slide_mpp=slide_mpp,
        heatmap=heatmap,
        ood_threshold=package.ood_threshold,
        allow_unusual=predictor.allow_out_of_scope,
    )


def _slide_score(package, result: SlideResult, positive: int) -> SlideScore:
    probs = np.array(result.class_means)  # other classes: mean over tiles; binary: the complement
    probs[positive] = result.score
    if len(probs) == 2:
        probs[1 - positive] = 1.0 - result.score
    points = SlideOperatingPoints.of(package)
    return SlideScore(
        file=result.path,
        frame=None,
        finding=points.finding(probs, positive, package.label_names),
        probability=result.score,
        priority=points.priority(result.score),
        decision=points.decision(result.score),
        probabilities={k: float(v) for k, v in zip(package.label_names, probs)},
        sop_uid="",
        study_uid="",
        series_uid="",
        modality="SM",
        model=package.name,
        version=package.version,
        sha256=package.sha256,
        positive_label=package.positive_label,
        calibrated=package.calibrated,
        aggregation=result.aggregation,
        n_tiles=result.n_tiles,
        n_background=result.n_background,
        n_unusual=result.n_unusual,
        flags=result.flags,
        tile_mpp=result.tile_mpp,
        slide_mpp=result.slide_mpp,
        top_tiles=result.top_tiles,
        threshold_level=points.level,
    )
