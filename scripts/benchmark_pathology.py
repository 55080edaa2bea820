"""Whole-slide tiling throughput: medtriage.io (read + tissue mask + stain normalisation) next to OpenSlide.

    python scripts/benchmark_pathology.py [--slide data/samples/CMU-1-Small-Region.svs] [--repeats 9]

Every measurement reads the same tiles (the tissue grid of the slide at the given tile size and
µm/pixel). "One core" pins the process to one CPU; "all cores" uses every CPU the process may run
on, with one reader thread per core; BLAS runs single-threaded in both. Medians over repeats; the
section `## Pathology` of docs/benchmarks.md is replaced (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from medtriage.benchmarking import interleaved_rates, machine, write_section
from medtriage.io.pathology import iter_tile_batches, open_slide, prepare_slide, read_tile, tile_grid, tissue_mask

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Pathology"


def openslide_read(path: Path, coords: list[tuple[int, int]], size: int):
    import openslide

    def run() -> int:
        with openslide.OpenSlide(str(path)) as slide:
            for x, y in coords:
                np.asarray(slide.read_region((x, y), 0, (size, size)))[..., :3]
        return len(coords)

    return run


def tiffslide_read(path: Path, coords: list[tuple[int, int]], size: int):
    import tiffslide

    def run() -> int:
        with tiffslide.TiffSlide(path) as slide:
            for x, y in coords:
                slide.read_region((x, y), 0, (size, size), as_array=True)
        return len(coords)

    return run


def medtriage_read(path: Path, tile_size: int, mpp: float):
    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_size, mpp, tissue_mask(slide))

    def run() -> int:
        with open_slide(path) as slide:
            reader = slide.reader()
            for tile in grid.tiles:
                read_tile(reader, grid, tile)
        return len(grid.tiles)

    return run


def medtriage_pipeline(path: Path, tile_size: int, mpp: float, workers: int):
    """Open + tissue mask + grid + stain fit, then every tissue tile read and normalised."""

    def run() -> int:
        prepared = prepare_slide(path, tile_size, mpp, stain_normalize=True)
        with prepared.slide:
            return sum(len(tiles) for tiles, _ in iter_tile_batches(prepared, batch_size=8, workers=workers))

    return run


def measure(path: Path, tile_size: int, mpp: float, repeats: int) -> dict:
    all_cores = sorted(os.sched_getaffinity(0))
    one_core = {all_cores[0]}
    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_size, mpp, tissue_mask(slide))
    coords = [(t.x, t.y) for t in grid.tiles]
    rates = interleaved_rates({
        "openslide read": (openslide_read(path, coords, grid.read_size), one_core),
        "tiffslide read": (tiffslide_read(path, coords, grid.read_size), one_core),
        "medtriage read": (medtriage_read(path, tile_size, mpp), one_core),
        "medtriage read + mask + normalise": (medtriage_pipeline(path, tile_size, mpp, 1), one_core),
        "all cores": (medtriage_pipeline(path, tile_size, mpp, len(all_cores)), set(all_cores)),
    }, repeats)
    return {"tiles": len(coords), "candidates": grid.n_candidates, "one_core": rates, "all_cores": rates["all cores"],
            "cores": len(all_cores)}


def table(path: Path, results: dict[int, dict], mpp: float) -> list[str]:
    lines = [
        "| tile (px @ µm/px) | tissue tiles | OpenSlide read, 1 core | tiffslide read, 1 core | medtriage read, 1 core "
        "| medtriage read+mask+normalise, 1 core | same, all cores | 1 core vs OpenSlide | all cores vs OpenSlide |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, r in results.items():
        one, base = r["one_core"], r["one_core"]["openslide read"]
        pipe = one["medtriage read + mask + normalise"]
        lines.append(
            f"| {size} @ {mpp} | {r['tiles']} of {r['candidates']} | {base:.0f} | {one['tiffslide read']:.0f} | "
            f"{one['medtriage read']:.0f} | {pipe:.0f} | {r['all_cores']:.0f} ({r['cores']} threads) | "
            f"{pipe / base:.2f}x | {r['all_cores'] / base:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=ROOT / "data" / "samples" / "CMU-1-Small-Region.svs")
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[224, 112])
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    # Pinning applies to this thread only, not to the BLAS library's own worker threads: keep BLAS to one.
    with threadpool_limits(1):
        results = {size: measure(args.slide, size, args.mpp, args.repeats) for size in args.tile_sizes}
    command = "python scripts/benchmark_pathology.py " + " ".join(
        [f"--tile-sizes {' '.join(map(str, args.tile_sizes))}", f"--mpp {args.mpp}", f"--repeats {args.repeats}"]
    )
    text = "\n".join([
        SECTION, "",
        f"Tiles per second (median of {args.repeats} runs) for the tissue tiles of `{args.slide.name}`: the same tile "
        "coordinates for every reader. OpenSlide and tiffslide columns only read; \"read+mask+normalise\" opens the slide, "
        "computes the tissue mask, lays out the grid, fits the slide's stains (Macenko) and returns every tile "
        "normalised as float32 `[3, S, S]`, all inside the timed run. \"1 core\" pins the process to one CPU; BLAS is "
        "kept to one thread throughout (pinning does not reach its worker threads).", "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}", "",
        *table(args.slide, results, args.mpp), "",
    ])
    print(text)
    write_section(text, args.doc)


if __name__ == "__main__":
    main()
