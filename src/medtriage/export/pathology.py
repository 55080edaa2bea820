"""The `pathology` block of a tile model's package: how slides are tiled, and slide-level operating points.

A tile model is served on whole slides (medtriage.serve.slides): tiles are cut at the training
pool's size and µm/pixel, stained the same way, and their probabilities aggregated into one slide
score. That score is not a tile probability (top-k of a slide sits higher than a typical tile), so
slide priorities get their own thresholds, chosen on validation slides aggregated exactly as serving
aggregates them, with the same rules as the tile thresholds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from medtriage.config.schema import ExportConfig
from medtriage.data.simulate.tiles import read_tile_info
from medtriage.errors import ConfigError, InputError
from medtriage.evaluation.operating_points import choose_priority_thresholds
from medtriage.export.package import split_metrics
from medtriage.format.aggregation import AGGREGATIONS, aggregate

log = logging.getLogger(__name__)
DEFAULT_MIN_TISSUE = 0.5


@dataclass
class SlideLabels:
    """Per tile of one split: the slide it was cut from, that slide's label (class index) and its site."""

    slide_ids: np.ndarray
    slide_labels: np.ndarray
    sites: np.ndarray


@dataclass
class TilePool:
    """What export needs to know about a tile pool: its `pathology.json` and the slides of val/test tiles."""

    tile_info: dict
    val: SlideLabels
    test: SlideLabels | None = None


def tile_pool_of(manifest, val_rows: np.ndarray, test_rows: np.ndarray | None) -> TilePool | None:
    """The TilePool of a manifest (None when it is not a tile pool); `*_rows` are positions in manifest.rows."""
    info = read_tile_info(manifest.pool_dir)
    if info is None:
        return None

    def slides(rows) -> SlideLabels:
        picked = manifest.rows.iloc[np.asarray(rows)]
        return SlideLabels(
            picked["slide_id"].astype(str).to_numpy(), picked["slide_label"].astype(int).to_numpy(), picked["site"].astype(str).to_numpy()
        )

    return TilePool(info, slides(val_rows), slides(test_rows) if test_rows is not None else None)


def slide_scores(tile_scores: np.ndarray, slides: SlideLabels, aggregation: str, top_k: int, split: str = "val"):
    """(score, label, site) per slide: tile scores aggregated as medtriage.serve.slides does at serving time.
    `split`: the TilePool field `slides` is (`val`, `test`), which a refusal names."""
    ids = np.asarray(slides.slide_ids).astype(str)
    if len(ids) != len(tile_scores):
        raise InputError(
            f"{len(tile_scores)} tile scores for {len(ids)} tiles with slide ids",
            where=f"TilePool.{split}",
            hint=f"give the slide of each {split} tile scored, in the order of its scores (tile_pool_of builds them from the "
            "pool's manifest rows)",
        )
    names = sorted(set(ids))
    members = [np.flatnonzero(ids == name) for name in names]
    scores = np.array(
        [aggregate(np.asarray(tile_scores)[m], aggregation, top_k, ("export.slide_aggregation", "export.slide_top_k")) for m in members]
    )
    labels = np.array([int(slides.slide_labels[m[0]]) for m in members])
    sites = np.array([str(slides.sites[m[0]]) for m in members])
    return scores, labels, sites


def check_slide_settings(cfg: ExportConfig) -> None:
    if cfg.slide_aggregation not in AGGREGATIONS:
        raise ConfigError(
            f"unknown slide aggregation '{cfg.slide_aggregation}'", where="export.slide_aggregation", hint=f"one of {AGGREGATIONS}"
        )
    if cfg.slide_top_k < 1:
        raise ConfigError(
            f"export.slide_top_k={cfg.slide_top_k}", where="export.slide_top_k", hint="the number of top tiles averaged: 1 or more"
        )


def pathology_block(
    pool: TilePool, cfg: ExportConfig, positive: int, val_scores: np.ndarray, test_scores: np.ndarray | None = None
) -> dict:
    """model.json's `pathology` block; `*_scores` are calibrated positive-class tile probabilities."""
    check_slide_settings(cfg)
    info = pool.tile_info
    block = {
        "tile_size": int(info["tile_size"]),
        "tile_mpp": float(info["tile_mpp"]),
        "stain_normalization": info.get("stain_normalization"),
        "target_stains": info.get("target_stains"),
        "min_tissue": float(info.get("min_tissue", DEFAULT_MIN_TISSUE)),
        "aggregation": cfg.slide_aggregation,
        "top_k": int(cfg.slide_top_k),
        "pool_source": info.get("source"),
    }
    scores, labels, sites = slide_scores(val_scores, pool.val, cfg.slide_aggregation, cfg.slide_top_k)
    try:
        thresholds = thresholds_by_export_rules(cfg, scores, labels == positive)  # the tile rules, on slide scores
    except InputError as err:  # e.g. validation slides of one class only
        log.warning("no slide-level thresholds (%s); slide priorities will use the tile thresholds", err.reason)
        return {**block, "threshold_level": "tile", "slide_thresholds": None, "note": f"no slide thresholds: {err.reason}"}
    review = thresholds["review"]["threshold"]
    metrics = {"val": split_metrics(scores, labels == positive, sites, review)}
    if test_scores is not None and pool.test is not None:
        t_scores, t_labels, t_sites = slide_scores(test_scores, pool.test, cfg.slide_aggregation, cfg.slide_top_k, "test")
        metrics["test"] = split_metrics(t_scores, t_labels == positive, t_sites, review)
    return {**block, "threshold_level": "slide", "slide_thresholds": thresholds, "slide_metrics": metrics}


def thresholds_by_export_rules(cfg: ExportConfig, scores: np.ndarray, is_positive: np.ndarray) -> dict:
    """The package's review/urgent thresholds by the export rules (tile scores, or slide scores aggregated from them)."""
    return choose_priority_thresholds(scores, is_positive, cfg.threshold_rule, cfg.threshold_target, cfg.urgent_rule, cfg.urgent_target)
