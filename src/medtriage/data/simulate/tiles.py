"""Pathology tile pools: SYNTHETIC H&E-like tiles from several "sites", and tiles cut from real slides.

The synthetic tiles are drawn, not scanned: nuclei (haematoxylin) on stroma (eosin), rendered
through a site-specific stain matrix so each site looks different, as scanners and staining
protocols make real sites look different. Tumour tiles have more, larger, darker and more
irregular nuclei than normal tiles; a per-tile "grade" blends the two so the classes overlap and
the task is learnable but not trivial. Site names start with `synthetic_` so they are never
mistaken for patient data.

Every slide belongs to one patient; splits are drawn per patient (stratified by slide label),
so tiles of one patient never straddle train and test. Tiles are float32 `[3, S, S]` in [0, 1].
Next to the manifest, `pathology.json` records the tile size, µm/pixel and stain normalisation
that a model trained on the pool must be served with.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medtriage.config.schema import SYNTHETIC_SITE_NAMES, SyntheticTilesConfig
from medtriage.data.manifest import Manifest, PoolWriter, load_manifest
from medtriage.data.pool_folder import MANIFEST_FILE, pool_lock
from medtriage.data.splits import assign_splits
from medtriage.errors import ConfigError, InputError
from medtriage.io.pathology import iter_tile_batches, prepare_slide
from medtriage.io.safe_output import write_atomic
from medtriage.io.stain import REFERENCE_STAINS, StainNormalizer, fit_stains
from medtriage.progress import progress

TILE_LABELS = ["normal", "tumour"]
SYNTHETIC_TILE_MPP = 1.0  # nuclei radii below are in pixels at this resolution
TILE_INFO_FILE = "pathology.json"
SERVE_MIN_TISSUE = 0.5  # synthetic tiles are all tissue; on real slides, keep positions at least half tissue
VAL_FRACTION, TEST_FRACTION = 0.2, 0.2


@dataclass(frozen=True)
class SiteStain:
    """How one site's staining and scanner turn stain amounts into RGB."""

    haematoxylin: tuple[float, float, float]  # OD per unit stain (R, G, B)
    eosin: tuple[float, float, float]
    h_strength: float = 1.0
    e_strength: float = 1.0
    background: float = 0.95  # brightness of glass


# Three deliberately different looks: textbook H&E, dark violet, pale pink-orange.
SYNTHETIC_SITES = dict(
    zip(
        SYNTHETIC_SITE_NAMES,
        (
            SiteStain((0.65, 0.70, 0.29), (0.07, 0.99, 0.11)),
            SiteStain((0.45, 0.80, 0.40), (0.25, 0.90, 0.35), h_strength=1.5, e_strength=0.7, background=0.90),
            SiteStain((0.80, 0.55, 0.25), (0.02, 0.75, 0.66), h_strength=0.7, e_strength=1.5, background=0.97),
        ),
    )
)


# --- drawing one tile ------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, bilinearly upsampled."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR))


def _nuclei_map(rng: np.random.Generator, size: int, grade: float) -> np.ndarray:
    """Haematoxylin amount per pixel: soft ellipses whose number, size, darkness and shape grow with grade."""
    count = rng.poisson(6 + 12 * grade)
    if count == 0:
        return np.zeros((size, size), np.float32)
    centres = rng.uniform(0, size, (count, 2))
    radius = np.clip(rng.normal(2.8 + 2.0 * grade, 0.3 + 0.8 * grade, count), 1.5, None)
    elongation = 1.0 + rng.uniform(0, 0.2 + 0.8 * grade, count)
    angle = rng.uniform(0, np.pi, count)
    darkness = rng.normal(0.9 + 0.5 * grade, 0.1 + 0.1 * grade, count).clip(0.4, None)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx[None] - centres[:, 0, None, None], yy[None] - centres[:, 1, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = (dx * cos + dy * sin) / (radius * elongation)[:, None, None], (-dx * sin + dy * cos) / radius[:, None, None]
    inside = 1.0 / (1.0 + np.exp(8.0 * (np.sqrt(u**2 + v**2) - 1.0)))  # soft edge
    return (inside * darkness[:, None, None]).max(axis=0).astype(np.float32)


def draw_tile(rng: np.random.Generator, size: int, tumour: bool, stain: SiteStain) -> np.ndarray:
    """One synthetic H&E-like tile, float32 `[3, size, size]` in [0, 1]."""
    grade = rng.uniform(0.35, 1.0) if tumour else rng.uniform(0.0, 0.65)
    nuclei = _nuclei_map(rng, size, grade)
    stroma = (0.35 + 0.5 * _smooth_noise(rng, size)) * (1.0 - 0.7 * nuclei.clip(0, 1))
    od = (
        np.asarray(stain.haematoxylin, np.float32)[:, None, None] * (stain.h_strength * nuclei)[None]
        + np.asarray(stain.eosin, np.float32)[:, None, None] * (stain.e_strength * stroma)[None]
    )
    pixels = stain.background * np.exp(-od) + rng.normal(0, 0.01, od.shape).astype(np.float32)
    return np.clip(pixels, 0.0, 1.0).astype(np.float32)


def jitter_stain(rng: np.random.Generator, stain: SiteStain, amount: float = 0.1) -> SiteStain:
    """Slide-to-slide variation within a site: strengths and stain vectors wobble a little."""
    wobble = lambda v: tuple(np.clip(np.asarray(v) * rng.uniform(1 - amount, 1 + amount, 3), 0.01, None))  # noqa: E731
    return SiteStain(
        wobble(stain.haematoxylin),
        wobble(stain.eosin),
        stain.h_strength * rng.uniform(1 - amount, 1 + amount),
        stain.e_strength * rng.uniform(1 - amount, 1 + amount),
        stain.background,
    )


# --- splits and pools ---------------------------------------------------------------------------


def patient_splits(patients: list[tuple[str, str, int]], seed: int, holdout_site: str | None = None) -> dict[tuple[str, str], str]:
    """(site, patient, slide label) -> split of each (site, patient) by the project's patient-level rules (a patient
    ID names a patient within its site only); a held-out site is all test."""
    kept = [(site, patient, label) for site, patient, label in patients if site != holdout_site]
    test_fraction = 0.0 if holdout_site else TEST_FRACTION
    rows = [{"site": site, "patient_id": patient, "label": label} for site, patient, label in kept]
    splits = dict(zip(((site, p) for site, p, _ in kept), assign_splits(rows, VAL_FRACTION, test_fraction, seed)))
    splits.update({(site, patient): "test" for site, patient, _ in patients if site == holdout_site})
    return splits


def _normalize_slide(tiles: list[np.ndarray], where: str) -> list[np.ndarray]:
    normalizer = StainNormalizer(fit_stains(tiles, where=where), REFERENCE_STAINS)
    return [normalizer(t) for t in tiles]


def write_tile_info(pool_dir: Path, tile_size: int, tile_mpp: float, stain_normalize: bool, **extra) -> None:
    """Written after the pool's manifest: a build that fails before then leaves the previous pool with its own
    record, which no longer matches the settings asked for, so the next run rebuilds instead of reusing it."""
    info = {
        "tile_size": tile_size,
        "tile_mpp": tile_mpp,
        "stain_normalization": "macenko" if stain_normalize else None,
        "target_stains": REFERENCE_STAINS.to_dict() if stain_normalize else None,
        **extra,
    }
    write_atomic(Path(pool_dir) / TILE_INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())


def read_tile_info(pool_dir: str | Path) -> dict | None:
    """The pool's tile settings; None for a pool that is not a tile pool."""
    path = Path(pool_dir) / TILE_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"unreadable tile settings ({err})", where=path, hint="rebuild the tile pool") from err
    if not isinstance(info, dict):
        raise InputError("tile settings are not a JSON object", where=path, hint="rebuild the tile pool")
    return info


def build_synthetic_tile_pool(pool_dir: str | Path, config: SyntheticTilesConfig | None = None) -> Manifest:
    """Write a pool of SYNTHETIC tiles: sites x patients (one slide each) x tiles."""
    config = config or SyntheticTilesConfig()
    sites = list(config.sites)
    if not sites or len(set(sites)) < len(sites):  # a repeated site would merge its patients with their namesakes
        raise InputError(
            f"the synthetic sites {sites} are not one or more distinct sites",
            where="data.tiles.sites",
            hint=f"name each site once, from {list(SYNTHETIC_SITES)}",
        )
    unknown = [s for s in [*config.sites, config.holdout_site] if s is not None and s not in SYNTHETIC_SITES]
    if unknown:
        raise InputError(f"unknown synthetic sites {unknown}", hint=f"choose from {list(SYNTHETIC_SITES)}")
    if config.holdout_site is not None and config.holdout_site not in config.sites:
        raise InputError(f"held-out site {config.holdout_site} is not among the sites {list(config.sites)}")
    rng = np.random.default_rng(config.seed)
    slides = [
        (site, f"{site}-p{p:03d}", int(rng.random() < config.tumour_slide_fraction))
        for site in config.sites
        for p in range(config.patients_per_site)
    ]
    splits = patient_splits(slides, config.seed, config.holdout_site)
    with pool_lock(pool_dir):
        with _tile_pool_writer(Path(pool_dir)) as writer:
            for site, patient, slide_label in progress(slides, len(slides), "synthetic slides", "slide"):
                _add_synthetic_slide(writer, rng, config, site, patient, slide_label, splits[site, patient])
            manifest = writer.close()
        write_tile_info(
            Path(pool_dir),
            config.tile_size,
            SYNTHETIC_TILE_MPP,
            config.stain_normalize,
            source="synthetic",
            min_tissue=SERVE_MIN_TISSUE,
            synthetic=asdict(config),
        )
    return manifest


def _tile_pool_writer(pool_dir: Path) -> PoolWriter:
    """A writer of a tile pool, the record of the pool it replaces gone first: a build cut short after its manifest,
    before its own record, must not leave its tiles looking made with the previous settings."""
    (pool_dir / TILE_INFO_FILE).unlink(missing_ok=True)
    return PoolWriter(pool_dir, TILE_LABELS)


def _add_synthetic_slide(
    writer: PoolWriter, rng, config: SyntheticTilesConfig, site: str, patient: str, slide_label: int, split: str
) -> None:
    stain = jitter_stain(rng, SYNTHETIC_SITES[site])
    labels = [int(slide_label and rng.random() < config.tumour_tile_fraction) for _ in range(config.tiles_per_slide)]
    tiles = [draw_tile(rng, config.tile_size, bool(label), stain) for label in labels]
    slide_id = f"{patient}-slide1"
    if config.stain_normalize:
        tiles = _normalize_slide(tiles, where=slide_id)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        writer.add(
            tile,
            site=site,
            patient_id=patient,
            study_uid=slide_id,
            series_uid=slide_id,
            sop_uid=f"{slide_id}-t{i:03d}",
            path=f"synthetic://{site}/{slide_id}/tile{i:03d}",
            label=label,
            split=split,
            slide_id=slide_id,
            slide_label=slide_label,
            x=(i % 4) * config.tile_size,
            y=(i // 4) * config.tile_size,
            tile_mpp=SYNTHETIC_TILE_MPP,
            tissue_fraction=1.0,
            stain_normalized=int(config.stain_normalize),
        )


def add_slide_tiles(
    writer: PoolWriter,
    path: str | Path,
    *,
    site: str,
    patient_id: str,
    label: int,
    split: str,
    tile_size: int = 224,
    mpp: float = 0.5,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
    stain_normalize: bool = False,
) -> int:
    """Cut a real slide into tissue tiles and add them (label = the slide's label); a bad slide is rejected, not raised."""
    try:
        prepared = prepare_slide(path, tile_size, mpp, min_tissue, slide_mpp=slide_mpp, stain_normalize=stain_normalize)
    except InputError as err:
        writer.reject(site, path, err.reason)
        return 0
    slide_id = Path(path).stem
    added = 0
    # A tile bar under the slides' bar: one large slide is minutes of tiles.
    bar = progress(None, len(prepared.grid.tiles), Path(path).name, "tile", leave=False)
    with prepared.slide, bar:
        for tiles, batch in iter_tile_batches(prepared):
            for tile, pixels in zip(tiles, batch):
                writer.add(
                    pixels,
                    site=site,
                    patient_id=patient_id,
                    study_uid=slide_id,
                    series_uid=slide_id,
                    sop_uid=f"{slide_id}-x{tile.x}-y{tile.y}",
                    path=f"{path}#x={tile.x},y={tile.y}",
                    label=label,
                    split=split,
                    slide_id=slide_id,
                    slide_label=label,
                    x=tile.x,
                    y=tile.y,
                    tile_mpp=mpp,
                    tissue_fraction=tile.tissue_fraction,
                    stain_normalized=int(stain_normalize),
                )
                added += 1
                bar.update()
    return added


def build_slide_pool(
    slides: list[dict], pool_dir: str | Path, tile_size: int = 224, mpp: float = 0.5, min_tissue: float = 0.5, stain_normalize: bool = False
) -> Manifest:
    """Pool from real slides: each entry has `path`, `site`, `patient_id`, `label` (int) and `split`."""
    _check_distinct_slide_ids([entry["path"] for entry in slides])
    with pool_lock(pool_dir):
        with _tile_pool_writer(Path(pool_dir)) as writer:
            for entry in progress(slides, len(slides), "slides", "slide"):
                add_slide_tiles(
                    writer,
                    entry["path"],
                    site=entry["site"],
                    patient_id=entry["patient_id"],
                    label=int(entry["label"]),
                    split=entry["split"],
                    tile_size=tile_size,
                    mpp=mpp,
                    min_tissue=min_tissue,
                    slide_mpp=entry.get("mpp"),
                    stain_normalize=stain_normalize,
                )
            manifest = writer.close()
        write_tile_info(Path(pool_dir), tile_size, mpp, stain_normalize, source="slides", min_tissue=min_tissue)
    return manifest


def _check_distinct_slide_ids(paths: list) -> None:
    """A slide's file name (without suffix) is its slide id in the pool: two slides of one name (from two folders,
    say) would be merged into one slide, their tiles sharing ids."""
    repeated = sorted(stem for stem, n in Counter(Path(p).stem for p in paths).items() if n > 1)
    if repeated:
        raise ConfigError(
            f"several slides are named {', '.join(repeated)}: a slide's name is its id in the pool",
            hint="rename the slides, or build a pool from each folder in its own run",
        )


def ensure_synthetic_tile_pool(pool_dir: str | Path, config: SyntheticTilesConfig) -> Manifest:
    """The pool for `config`, built on first use; rebuilt when the folder holds a pool made with other settings."""
    pool_dir = Path(pool_dir)
    try:
        info = read_tile_info(pool_dir)
    except InputError:
        info = None  # a damaged record cannot vouch for the pool: rebuild it
    if (pool_dir / MANIFEST_FILE).is_file() and info and info.get("synthetic") == asdict(config):
        return load_manifest(pool_dir)
    if (pool_dir / MANIFEST_FILE).is_file():
        print(f"tile pool {pool_dir} was built with other settings: rebuilding it")
    return build_synthetic_tile_pool(pool_dir, config)
