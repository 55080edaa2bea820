"""Build a pathology tile pool: SYNTHETIC multi-site tiles, or tiles cut from real slides.

    python scripts/make_tiles.py synthetic data/pool/pathology_tiles [--stain-normalize] [--holdout-site synthetic_site_b]
    python scripts/make_tiles.py slides data/pool/cmu1 data/samples/CMU-1-Small-Region.svs --label 0 \
        --overview docs/images/cmu1_tiles.png

Training builds the synthetic pool itself on first use (`experiment=pathology_tiles`); this script
is for looking at pools and for real slides. Prints the pool summary (counts per site, split, label, rejects).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from medtriage.data.sources.pathology_tiles import SyntheticTilesConfig, build_slide_pool, build_synthetic_tile_pool
from medtriage.io.pathology import grid_overview, prepare_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    synthetic = sub.add_parser("synthetic", help="SYNTHETIC H&E-like tiles from several stain 'sites'")
    synthetic.add_argument("pool_dir", type=Path)
    synthetic.add_argument("--patients-per-site", type=int, default=24)
    synthetic.add_argument("--tiles-per-slide", type=int, default=12)
    synthetic.add_argument("--tile-size", type=int, default=64)
    synthetic.add_argument("--stain-normalize", action="store_true")
    synthetic.add_argument("--holdout-site", default=None)
    synthetic.add_argument("--seed", type=int, default=0)
    slides = sub.add_parser("slides", help="tissue tiles of real slides (one patient per slide)")
    slides.add_argument("pool_dir", type=Path)
    slides.add_argument("slides", nargs="+", type=Path)
    slides.add_argument("--label", type=int, default=0, help="label of every slide given (0 = normal, 1 = tumour)")
    slides.add_argument("--site", default="slides")
    slides.add_argument("--split", default="test")
    slides.add_argument("--tile-size", type=int, default=224)
    slides.add_argument("--tile-mpp", type=float, default=0.5)
    slides.add_argument("--mpp", type=float, default=None, help="scan µm/pixel for slides that do not record it")
    slides.add_argument("--stain-normalize", action="store_true")
    slides.add_argument("--overview", type=Path, help="save the first slide's thumbnail with tissue mask and tile grid here")
    args = parser.parse_args()

    if args.kind == "synthetic":
        config = SyntheticTilesConfig(
            patients_per_site=args.patients_per_site, tiles_per_slide=args.tiles_per_slide, tile_size=args.tile_size,
            stain_normalize=args.stain_normalize, holdout_site=args.holdout_site, seed=args.seed,
        )
        manifest = build_synthetic_tile_pool(args.pool_dir, config)
    else:
        entries = [{"path": str(p), "site": args.site, "patient_id": p.stem, "label": args.label, "split": args.split, "mpp": args.mpp}
                   for p in args.slides]
        manifest = build_slide_pool(entries, args.pool_dir, args.tile_size, args.tile_mpp, stain_normalize=args.stain_normalize)
        if args.overview:
            save_overview(args.slides[0], args.overview, args.tile_size, args.tile_mpp, args.mpp)
    print(manifest.summary())


def save_overview(slide_path: Path, out: Path, tile_size: int, tile_mpp: float, slide_mpp: float | None) -> None:
    prepared = prepare_slide(slide_path, tile_size, tile_mpp, slide_mpp=slide_mpp)
    with prepared.slide:
        image = grid_overview(prepared.slide, prepared.grid, prepared.mask, max_side=720)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)  # a palette keeps the PNG small
    grid = prepared.grid
    print(f"overview {out}: {len(grid.tiles)} tissue tiles of {grid.n_candidates} positions "
          f"({tile_size} px at {tile_mpp} µm/px), mask threshold {prepared.mask.threshold:.3f}")


if __name__ == "__main__":
    main()
