"""Site ingest rate next to bare pydicom decoding of the same files.

    python scripts/benchmark_ingest.py [--images 600] [--repeats 5]

Writes the simulated 3-site export (`make_sites`, real PneumoniaMNIST X-rays: native 8/12-bit and
JPEG 2000 lossless files, plus the planted SR and truncated file) to a temporary folder, then times
in interleaved rounds (so a busy neighbour slows all alike), each on one pinned core:
- bare pydicom: `dcmread` + `pixel_array` of every file (failures caught and counted);
- `ingest_site` into an empty pool (a new folder each round: deleting the last round's output is
  not ingest work, so it is not timed): read, keyed content hash, screen, structural pixel check,
  de-identify, write, index, labels, audit log; and the same with `verify_pixels` (a full decode);
and the same ingest with one worker process per available core. Medians over the rounds; the
`## Ingest` section of docs/benchmarks.md is replaced (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import tempfile
from pathlib import Path

import pydicom

from medtriage.benchmarking import interleaved_rates, machine, write_section
from medtriage.data.sources.dicom_sites import make_sites
from medtriage.io.deid import SiteKey
from medtriage.io.ingest import ingest_site

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Ingest"
TARGET = 0.80  # ingest on one core, as a share of bare decoding


def bare_decode(files: list[Path]):
    def run() -> int:
        for path in files:
            try:
                pydicom.dcmread(path).pixel_array
            except Exception:
                pass  # the planted truncated file and the SR: read, then fail, as in ingest
        return len(files)

    return run


def ingest(sites: Path, pools: Path, workers: int, verify: bool = False):
    rounds = itertools.count()

    def run() -> int:
        pool = pools / f"pool-{next(rounds)}"  # empty each round; deleting the last round's is not ingest work
        count = 0
        for i, folder in enumerate(sorted(p for p in sites.iterdir() if p.is_dir())):
            summary = ingest_site(folder.name, folder, pool, key=SiteKey(bytes([97 + i]) * 32), workers=workers,
                                  verify_pixels=verify, progress=False)
            count += summary.counts_in
        return count

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="X-rays written across the 3 sites (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    where = machine()  # its load average is the one at the start
    with tempfile.TemporaryDirectory() as tmp:
        sites = Path(tmp) / "sites"
        make_sites(ROOT / "data/samples/pneumoniamnist_28.npz", sites, seed=0, limit=args.images)
        files = sorted(sites.rglob("*.dcm"))
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        rates = interleaved_rates({
            "bare": (bare_decode(files), {cores[0]}),
            "ingest": (ingest(sites, Path(tmp) / "ingest", 1), {cores[0]}),
            "ingest_verify": (ingest(sites, Path(tmp) / "ingest_verify", 1, verify=True), {cores[0]}),
            "ingest_all": (ingest(sites, Path(tmp) / "ingest_all", len(cores)), set(cores)),
        }, args.repeats)
    command = f"python scripts/benchmark_ingest.py --images {args.images} --repeats {args.repeats}"
    share = rates["ingest"] / rates["bare"]
    verdict = "meets the target" if share >= TARGET else "misses the target"
    text = f"""{SECTION}

`{command}` — {where}, {datetime.date.today().isoformat()}.
{len(files)} files ({megabytes:.1f} MB) from the simulated 3-site export (native 8/12/16-bit and JPEG 2000
lossless X-rays, one SR and one truncated file); medians of {args.repeats} interleaved rounds.

| run | files/s |
|---|---:|
| bare pydicom `dcmread` + `pixel_array`, 1 core | {rates['bare']:.0f} |
| `medtriage ingest` (keyed hash, screen, structural pixel check, de-identify, write, index, labels, log), 1 core | {rates['ingest']:.0f} |
| `medtriage ingest --verify-pixels` (the same, plus a full decode), 1 core | {rates['ingest_verify']:.0f} |
| `medtriage ingest --workers {len(cores)}`, {len(cores)} cores | {rates['ingest_all']:.0f} |

Ingest on one core runs at **{share:.0%}** of bare decoding: it {verdict} (≥ {TARGET:.0%});
with `--verify-pixels` at {rates['ingest_verify'] / rates['bare']:.0%}; with {len(cores)} workers at {rates['ingest_all'] / rates['bare']:.0%}.
Bare decoding reads each file and decodes its pixels (the JPEG 2000 ones dominate); ingest does not decode
by default but hashes, screens, de-identifies and writes every file (new files: file-system work bare
decoding never does). Each ingest round writes into a new, empty pool; deleting the previous round's output
is not ingest work and is not timed. Rates move with the load of the shared machine; the rounds interleave
so that the ratio moves less.
"""
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
