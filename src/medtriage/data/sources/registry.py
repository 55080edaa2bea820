"""Where pools come from: `data.source` names a builder (MedMNIST npz, site folders, synthetic tiles) and
`load_pool(data)` returns its pooled manifest, building it on first use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from medtriage.config.schema import SyntheticTilesConfig
from medtriage.data.folds import all_labelled, cross_validation_fold
from medtriage.data.holdout import hold_out_site
from medtriage.data.manifest import Manifest, load_manifest
from medtriage.data.pool import build_sites_pool
from medtriage.data.pool_folder import MANIFEST_FILE, pool_lock
from medtriage.data.simulate.tiles import ensure_synthetic_tile_pool
from medtriage.data.sources.medmnist import build_npz_pool, npz_pool_is_current
from medtriage.errors import ConfigError, DataNotFoundError


def _npz_pool(data) -> Manifest:
    pool_dir = Path(data.pool_dir)
    if data.npz_path and not npz_pool_is_current(data.npz_path, pool_dir):  # a missing npz fails here with its path
        manifest = build_npz_pool(data.npz_path, pool_dir, list(data.label_names))
    elif (pool_dir / MANIFEST_FILE).is_file():
        manifest = load_manifest(pool_dir)
    else:
        raise ConfigError("source 'npz' needs a path", where="data.npz_path", hint="e.g. data/samples/pneumoniamnist_28.npz")
    print(manifest.summary())
    return manifest


def _sites_pool(data) -> Manifest:
    sites_dir = Path(data.sites_dir or "")
    if not data.sites_dir or not sites_dir.is_dir():
        raise DataNotFoundError(
            "site folders not found",
            where=sites_dir if data.sites_dir else "data.sites_dir",
            hint="create them with `python scripts/make_sites.py` then `python scripts/ingest_sites.py --create-keys` "
            "(de-identified pool), or point data.sites_dir at existing site folders",
        )
    return build_sites_pool(sites_dir, Path(data.pool_dir), seed=data.pool_seed)  # reuses an unchanged pool


def _tiles_pool(data) -> Manifest:
    settings = OmegaConf.to_object(data.tiles) if OmegaConf.is_config(data.tiles) else data.tiles
    return ensure_synthetic_tile_pool(
        data.pool_dir, settings if isinstance(settings, SyntheticTilesConfig) else SyntheticTilesConfig(**settings)
    )


# data.source -> builder of the pooled manifest (each prints its per-site summary). New sources register here.
SOURCES: dict[str, Callable[..., Manifest]] = {"npz": _npz_pool, "sites": _sites_pool, "tiles": _tiles_pool}


def build_pool(data) -> Manifest:
    """The whole pooled manifest the `data` config group describes, built on first use. Runs that start side by side
    on a pool not built yet (cross-validation folds, DDP ranks, two users) take turns (`pool_lock`): the first builds
    it, the others wait and then find it current and reuse it."""
    if data.source not in SOURCES:
        raise ConfigError(f"unknown data source '{data.source}'", where="data.source", hint=f"choose one of: {', '.join(SOURCES)}")
    with pool_lock(data.pool_dir):  # the check whether the pool is current and the build are one step
        manifest = SOURCES[data.source](data)
    if list(manifest.label_names) != list(data.label_names):
        raise ConfigError(
            f"pool labels {manifest.label_names} differ from the config's {list(data.label_names)}",
            where="data.label_names",
            hint=f"set data.label_names to {manifest.label_names} or rebuild {manifest.pool_dir}",
        )
    return manifest


def load_pool(data) -> Manifest:
    """The pooled manifest the `data` config group describes, built on first use (and one site held out when asked)."""
    manifest = build_pool(data)
    if getattr(data, "holdout_site", None):
        pooled = bool(getattr(data, "cv_folds", None) or getattr(data, "refit", False))  # folds or a refit: no validation split kept
        manifest = hold_out_site(manifest, data.holdout_site, validated=not pooled)
    known_duplicates = bool(getattr(data, "allow_audit_failure", False))  # test images also in train: as the audit's override
    if getattr(data, "cv_folds", None):
        manifest = cross_validation_fold(manifest, data.cv_folds, data.cv_fold, data.cv_seed, allow_duplicates=known_duplicates)
    if getattr(data, "refit", False):
        manifest = all_labelled(manifest, allow_duplicates=known_duplicates)
    return manifest
