"""Site ingest rate next to bare pydicom doing the same kind of work on the same files.

    python -m benchmarks.ingest [--images 600] [--repeats 5] [--quick] [--no-write]

Writes the simulated 3-site export (real PneumoniaMNIST X-rays: native 8/12/16-bit and JPEG 2000
lossless files, plus the planted SR and truncated file) to a temporary folder, then times in
interleaved rounds, each on one pinned core, two pairs that do equal work:
- without decoding: bare `dcmread` of every file vs `ingest_sites` (read, keyed content hash, screen,
  structural pixel check, de-identify, write, index, labels, audit log);
- with decoding: bare `dcmread` + `pixel_array` vs `ingest_sites(verify_pixels=True)` (the same plus a
  full decode);
and ingest with one worker process per available core. Each ingest round writes into a new, empty
pool (deleting the last round's output is not ingest work, so it is not timed). Medians over the
rounds; the `## Ingest` section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import pydicom

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
from medtriage.data.simulate.sites import make_sites
from medtriage.io.ingest import ingest_sites

SECTION = "## Ingest"
TARGET = 0.80  # ingest on one core, as a share of bare pydicom doing the same decoding (or none)
NPZ = ROOT / "data" / "samples" / "pneumoniamnist_28.npz"


def bare_pydicom(files: list[Path], decode: bool):
    def run() -> int:
        for path in files:
            try:
                dataset = pydicom.dcmread(path)
                if decode:
                    _ = dataset.pixel_array
            except Exception:
                pass  # the planted truncated file and the SR: read, then fail, as in ingest
        return len(files)

    return run


def ingest(sites: Path, pools: Path, workers: int, verify: bool = False):
    rounds = itertools.count()

    def run() -> int:
        pool = pools / f"pool-{next(rounds)}"  # each site with the key the simulator wrote for it
        summaries = ingest_sites(sites, pool, workers=workers, verify_pixels=verify, progress=False)
        return sum(summary.counts_in for summary in summaries)

    return run


def measure(images: int, repeats: int) -> dict:
    cores = usable_cpus()
    one, every = {cores[0]}, set(cores)
    with tempfile.TemporaryDirectory() as tmp:
        sites = Path(tmp) / "sites"
        make_sites(NPZ, sites, seed=0, limit=images)
        files = sorted(sites.rglob("*.dcm"))
        timings = interleaved(
            {
                "read": bare_pydicom(files, decode=False),
                "ingest": ingest(sites, Path(tmp) / "ingest", 1),
                "decode": bare_pydicom(files, decode=True),
                "ingest_verify": ingest(sites, Path(tmp) / "ingest_verify", 1, verify=True),
                "ingest_all": ingest(sites, Path(tmp) / "ingest_all", len(cores)),
            },
            repeats,
            cpus={"read": one, "ingest": one, "decode": one, "ingest_verify": one, "ingest_all": every},
        )
        megabytes = sum(p.stat().st_size for p in files) / 1e6
    return {
        "files": len(files),
        "megabytes": megabytes,
        "cores": len(cores),
        "repeats": repeats,
        "rates": {name: t.rate for name, t in timings.items()},
    }


def markdown(result: dict, command: str, machine_line: str) -> str:
    rates, cores = result["rates"], result["cores"]
    plain, decoding = rates["ingest"] / rates["read"], rates["ingest_verify"] / rates["decode"]
    return (
        "\n".join(
            [
                SECTION,
                "",
                *header(command, machine_line),
                f"- data: {result['files']} files ({result['megabytes']:.1f} MB) from the simulated 3-site export (native "
                "8/12/16-bit and JPEG 2000 lossless X-rays, one SR and one truncated file); medians of "
                f"{result['repeats']} interleaved rounds, each run pinned to one core unless stated",
                "",
                "| run | files/s |",
                "|---|---:|",
                f"| (a) bare pydicom `dcmread`, no pixel decoding | {rates['read']:.0f} |",
                f"| (b) `medtriage ingest` (keyed hash, screen, structural pixel check, de-identify, write, index, labels, log) | {rates['ingest']:.0f} |",
                f"| (c) bare pydicom `dcmread` + `pixel_array` | {rates['decode']:.0f} |",
                f"| (d) `medtriage ingest --verify-pixels` (b plus a full decode) | {rates['ingest_verify']:.0f} |",
                f"| (e) `medtriage ingest --workers {cores}`, {cores} cores | {rates['ingest_all']:.0f} |",
                "",
                f"Target: ingest on one core at ≥ {TARGET:.0%} of bare pydicom doing the same decoding.",
                f"- without decoding, b/a = {plain:.0%}: {verdict(plain >= TARGET)}",
                f"- with decoding, d/c = {decoding:.0%}: {verdict(decoding >= TARGET)}",
                f"- {cores} workers without decoding, e/a = {rates['ingest_all'] / rates['read']:.0%} (no target)",
                "",
                "Ingest also writes every file (file-system work bare pydicom never does). Each ingest round writes into a "
                "new, empty pool; deleting the previous round's output is not timed. Rates move with the load of the "
                "machine; the rounds interleave so that the ratios move less.",
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="X-rays written across the 3 sites (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="150 images, 3 rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    images, repeats = (150, 3) if args.quick else (args.images, args.repeats)
    where = machine()  # its load average is the one at the start
    text = markdown(measure(images, repeats), command_line(), where)
    if args.no_write:
        print(text)
    else:
        publish(text)


if __name__ == "__main__":
    main()
