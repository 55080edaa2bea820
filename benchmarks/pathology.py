"""Whole-slide tiling throughput: medtriage.io next to OpenSlide and tiffslide on the same tiles.

    python -m benchmarks.pathology [--slide data/samples/CMU-1-Small-Region.svs] [--repeats 9] [--quick]

Every measurement reads the same tiles (the tissue grid of the slide at the given tile size and
µm/pixel). "1 core" pins the process to one CPU; "all cores" uses every CPU the process may run
on, with one reader thread per core; BLAS runs single-threaded throughout (pinning does not reach
its worker threads). Medians over interleaved repeats; the `## Pathology` section of
docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.common import (
    ROOT,
    command_line,
    header,
    interleaved,
    machine,
    publish,
    usable_cpus,
    verdict,
)
from medtriage.io.pathology import (
    iter_tile_batches,
    open_slide,
    prepare_slide,
    read_tile,
    tile_grid,
    tissue_mask,
)

SECTION = "## Pathology"
SLIDE = ROOT / "data" / "samples" / "CMU-1-Small-Region.svs"
TARGET = 1.0  # medtriage's tile read on one core, as a multiple of OpenSlide's read of the same tiles


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


def medtriage_read(path: Path, grid):
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
    cores = usable_cpus()
    one = {cores[0]}
    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_size, mpp, tissue_mask(slide))
    coords = [(t.x, t.y) for t in grid.tiles]
    timings = interleaved(
        {
            "openslide": openslide_read(path, coords, grid.read_size),
            "tiffslide": tiffslide_read(path, coords, grid.read_size),
            "read": medtriage_read(path, grid),
            "pipeline": medtriage_pipeline(path, tile_size, mpp, 1),
            "pipeline_all": medtriage_pipeline(path, tile_size, mpp, len(cores)),
        },
        repeats,
        cpus={"openslide": one, "tiffslide": one, "read": one, "pipeline": one, "pipeline_all": set(cores)},
    )
    return {
        "tiles": len(coords),
        "candidates": grid.n_candidates,
        "cores": len(cores),
        "rates": {name: t.rate for name, t in timings.items()},
    }


def table(results: dict[int, dict], mpp: float) -> list[str]:
    lines = [
        "| tile (px @ µm/px) | tissue tiles | (a) OpenSlide read | (b) tiffslide read | (c) medtriage read "
        "| (d) medtriage read + mask + normalise | (e) d on all cores | c/a | e/d |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, r in results.items():
        rates = r["rates"]
        lines.append(
            f"| {size} @ {mpp} | {r['tiles']} of {r['candidates']} | {rates['openslide']:.0f} | {rates['tiffslide']:.0f} | "
            f"{rates['read']:.0f} | {rates['pipeline']:.0f} | {rates['pipeline_all']:.0f} ({r['cores']} threads) | "
            f"{rates['read'] / rates['openslide']:.2f}x | {rates['pipeline_all'] / rates['pipeline']:.2f}x |"
        )
    return lines


def markdown(results: dict[int, dict], slide: Path, mpp: float, repeats: int, command: str, machine_line: str) -> str:
    verdicts = [
        f"- {size} px tiles: c/a = {r['rates']['read'] / r['rates']['openslide']:.2f}x: "
        f"{verdict(r['rates']['read'] / r['rates']['openslide'] >= TARGET)}"
        for size, r in results.items()
    ]
    return (
        "\n".join(
            [
                SECTION,
                "",
                *header(command, machine_line),
                f"- data: the tissue tiles of `{slide.name}`, the same tile coordinates for every reader; tiles/s, median of "
                f"{repeats} interleaved runs; (a)-(d) pinned to one core",
                "",
                "(a)-(c) only read the tiles. (d) opens the slide, computes the tissue mask, lays out the grid, fits the slide's "
                "stains (Macenko) and returns every tile normalised as float32 `[3, S, S]`, all inside the timed run: more work "
                "than a read, so it has no ratio against (a).",
                "",
                *table(results, mpp),
                "",
                f"Target: medtriage's tile read on one core at least {TARGET:.1f}x OpenSlide's read of the same tiles (c/a).",
                *verdicts,
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=SLIDE)
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[224, 112])
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    where = machine()
    with threadpool_limits(1):
        results = {size: measure(args.slide, size, args.mpp, repeats) for size in args.tile_sizes}
    publish(markdown(results, args.slide, args.mpp, repeats, command_line(), where), args.doc)


if __name__ == "__main__":
    main()
