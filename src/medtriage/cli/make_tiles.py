"""Build a pathology tile pool: SYNTHETIC multi-site tiles, or tiles cut from real slides.

    python scripts/make_tiles.py synthetic data/pool/pathology_tiles [--stain-normalize] [--holdout-site synthetic_site_b]
    python scripts/make_tiles.py slides data/pool/cmu1 data/samples/CMU-1-Small-Region.svs --label 0 \
        --overview docs/images/cmu1_tiles.png
    python scripts/make_tiles.py sites-figure docs/images/synthetic_sites_macenko.png

Training builds the synthetic pool itself on first use (`experiment=pathology_tiles`); this script
is for looking at pools and for real slides. Prints the pool summary (counts per site, split, label, rejects).
`sites-figure` draws one normal and one tumour slide per synthetic site, raw and Macenko-normalised
(stains fitted per slide), and prints the fitted stain vectors next to the generator's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from medtriage.arguments import (
    non_negative_int,
    path,
    positive_float,
    positive_int,
    refuse_file_as_folder,
    refuse_folder_as_file,
    whole_number,
)
from medtriage.cli import report_errors, write_output
from medtriage.data.manifest import REJECTS_FILE
from medtriage.data.simulate.tiles import (
    SYNTHETIC_SITES,
    SyntheticTilesConfig,
    build_slide_pool,
    build_synthetic_tile_pool,
    draw_tile,
    jitter_stain,
)
from medtriage.errors import DataNotFoundError
from medtriage.io.pathology import grid_overview, prepare_slide
from medtriage.io.stain import StainNormalizer, fit_stains

MAX_TILE_SIZE = 4096  # pixels a side: a larger tile is a typo, and one tile of it would take gigabytes
tile_side = whole_number(1, MAX_TILE_SIZE)


def main(argv: list[str] | None = None) -> int:
    return report_errors(_main, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    synthetic = sub.add_parser("synthetic", help="SYNTHETIC H&E-like tiles from several stain 'sites'")
    synthetic.add_argument("pool_dir", type=path, help="pool folder to write (created if missing)")
    synthetic.add_argument("--patients-per-site", type=positive_int, default=24, help="one slide each (default: %(default)s)")
    synthetic.add_argument("--tiles-per-slide", type=positive_int, default=12, help="tiles drawn from each slide (default: %(default)s)")
    synthetic.add_argument(
        "--tile-size", type=tile_side, default=64, help=f"tile side in pixels, up to {MAX_TILE_SIZE} (default: %(default)s)"
    )
    synthetic.add_argument("--stain-normalize", action="store_true", help="Macenko-normalise every tile (default: raw stains)")
    synthetic.add_argument(
        "--holdout-site",
        default=None,
        choices=list(SYNTHETIC_SITES),
        help="put all of this site's patients in test, none in train or val (default: none held out)",
    )
    synthetic.add_argument("--seed", type=non_negative_int, default=0, help="same seed, same tiles (default: %(default)s)")
    slides = sub.add_parser("slides", help="tissue tiles of real slides (one patient per slide)")
    slides.add_argument("pool_dir", type=path, help="pool folder to write (created if missing)")
    slides.add_argument("slides", nargs="+", type=path, help="whole-slide images (.svs, .tif, ... or a DICOM slide folder)")
    slides.add_argument(
        "--label", type=int, choices=[0, 1], default=0, help="label of every slide given, 0 = normal, 1 = tumour (default: %(default)s)"
    )
    slides.add_argument("--site", default="slides", help="site name of every slide given (default: %(default)s)")
    slides.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="split of every slide given (default: %(default)s)"
    )
    slides.add_argument(
        "--tile-size", type=tile_side, default=224, help=f"tile side in pixels, up to {MAX_TILE_SIZE} (default: %(default)s)"
    )
    slides.add_argument("--tile-mpp", type=positive_float, default=0.5, help="tile resolution in µm/pixel (default: %(default)s)")
    slides.add_argument(
        "--mpp", type=positive_float, default=None, help="scan µm/pixel of every slide given, overriding what a slide records"
    )
    slides.add_argument("--stain-normalize", action="store_true", help="Macenko-normalise every tile (default: raw stains)")
    slides.add_argument(
        "--overview", type=path, help="save the thumbnail of the first slide in the pool with its tissue mask and tile grid here"
    )
    figure = sub.add_parser("sites-figure", help="PNG of each synthetic site's tiles, raw and Macenko-normalised")
    figure.add_argument("out", type=path, help="PNG file to write")
    figure.add_argument("--tiles", type=positive_int, default=6, help="tiles shown per slide (default: %(default)s)")
    figure.add_argument("--seed", type=non_negative_int, default=0, help="same seed, same figure (default: %(default)s)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for name, option in (("out", "OUT"), ("overview", "--overview")):
        refuse_folder_as_file(getattr(args, name, None), option, "tiles.png")
    if args.kind != "sites-figure":
        refuse_file_as_folder(args.pool_dir, "POOL_DIR")

    if args.kind == "sites-figure":
        save_sites_figure(args.out, args.tiles, args.seed)
        return 0

    if args.kind == "synthetic":
        config = SyntheticTilesConfig(
            patients_per_site=args.patients_per_site,
            tiles_per_slide=args.tiles_per_slide,
            tile_size=args.tile_size,
            stain_normalize=args.stain_normalize,
            holdout_site=args.holdout_site,
            seed=args.seed,
        )
        manifest = build_synthetic_tile_pool(args.pool_dir, config)
    else:
        entries = [
            {"path": str(p), "site": args.site, "patient_id": p.stem, "label": args.label, "split": args.split, "mpp": args.mpp}
            for p in args.slides
        ]
        manifest = build_slide_pool(entries, args.pool_dir, args.tile_size, args.tile_mpp, stain_normalize=args.stain_normalize)
        if not len(manifest.rows):  # not a 0-tile pool that passes for a result
            raise DataNotFoundError(
                "no tile of the slides given made it into the pool",
                where=args.pool_dir / REJECTS_FILE,
                hint="read the reasons there, and give readable whole-slide images (.svs, .tif, ... or a DICOM slide folder)",
            )
        if args.overview:  # of the first slide in the pool: one left out (in the rejects) has no tiles to show
            pooled = set(manifest.rows["patient_id"])  # a text column: each slide's file name, as given above
            first = next(p for p in args.slides if p.stem in pooled)
            save_overview(first, args.overview, args.tile_size, args.tile_mpp, args.mpp)
    print(manifest.summary())
    return 0


def save_png(image: Image.Image, out: Path) -> None:
    """A palette PNG (keeps it small), written whole or not at all."""
    write_output(out, lambda f: image.quantize(256, method=Image.Quantize.MEDIANCUT).save(f, format="PNG", optimize=True), "PNG")


def save_overview(slide_path: Path, out: Path, tile_size: int, tile_mpp: float, slide_mpp: float | None) -> None:
    prepared = prepare_slide(slide_path, tile_size, tile_mpp, slide_mpp=slide_mpp)
    with prepared.slide:
        image = grid_overview(prepared.slide, prepared.grid, prepared.mask, max_side=720)
    save_png(image, out)
    grid = prepared.grid
    print(
        f"overview {out} of {slide_path.name}: {len(grid.tiles)} tissue tiles of {grid.n_candidates} positions "
        f"({tile_size} px at {tile_mpp} µm/px), mask threshold {prepared.mask.threshold:.3f}"
    )


def save_sites_figure(out: Path, n_tiles: int, seed: int, size: int = 64, gap: int = 4) -> None:
    """Rows: site x slide label; left block raw tiles, right block the same tiles normalised (fit on 12 tiles)."""
    rng = np.random.default_rng(seed)
    rows = []
    for site, stain in SYNTHETIC_SITES.items():
        for tumour in (False, True):
            slide_stain = jitter_stain(rng, stain)
            tiles = [draw_tile(rng, size, tumour, slide_stain) for _ in range(12)]
            fitted = fit_stains(tiles)
            normalizer = StainNormalizer(fitted)
            rows.append(tiles[:n_tiles] + [normalizer(t) for t in tiles[:n_tiles]])
            true = np.stack([slide_stain.haematoxylin, slide_stain.eosin], axis=1)
            true = true / np.linalg.norm(true, axis=0)
            off = np.degrees(np.arccos(np.clip(np.sum(fitted.matrix * true, axis=0), -1, 1)))
            print(
                f"{site} {'tumour' if tumour else 'normal'} slide: fitted H {fitted.matrix[:, 0].round(3)} "
                f"(true {true[:, 0].round(3)}, {off[0]:.1f}° off), E {fitted.matrix[:, 1].round(3)} "
                f"(true {true[:, 1].round(3)}, {off[1]:.1f}° off), max concentrations {fitted.max_concentrations.round(2)}"
            )
    step = size + gap
    canvas = np.ones((len(rows) * step + gap, 2 * n_tiles * step + 5 * gap, 3), np.float32)
    for r, row in enumerate(rows):
        for i, tile in enumerate(row):
            x = gap + i * step + (4 * gap if i >= n_tiles else 0)  # a wider gap between raw and normalised
            canvas[gap + r * step : gap + r * step + size, x : x + size] = np.moveaxis(tile, 0, -1)
    save_png(Image.fromarray(np.rint(canvas * 255).astype(np.uint8)), out)
    print(f"sites figure {out}: rows {', '.join(f'{s} normal/tumour' for s in SYNTHETIC_SITES)}; left raw, right normalised")


if __name__ == "__main__":
    sys.exit(main())
