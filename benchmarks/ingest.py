"""Site ingest rate next to bare pydicom doing the same kind of work on the same files.

    python -m benchmarks.ingest [--images 600] [--repeats 5] [--quick] [--no-write]

Writes the simulated 3-site export (real PneumoniaMNIST X-rays: native 8/12/16-bit and JPEG 2000
lossless files, plus the planted SR and truncated file) to a temporary folder, then times in
interleaved rounds, each on one pinned core, two pairs that do equal work, judged against the target:
- without decoding: bare `dcmread` of every file, each written back durably (`durable_write`: a temporary
  file in the destination folder, write, fsync, rename, fsync the folder, as any writer whose success
  means "on disk" must), vs `ingest_sites` (read, keyed content hash, screen, structural pixel check,
  de-identify, durable write, index, labels, audit log);
- with decoding: the same baseline plus `pixel_array` vs `ingest_sites(verify_pixels=True)` (the same
  plus a full decode);
bare `dcmread` (and `dcmread` + `pixel_array`) writing nothing, and the durable baseline with its folders
fsynced once per batch as ingest does (group commit), as references; and ingest with one worker process
per available core. Each ingest or writing round writes into a new, empty folder (deleting the
last round's output is not ingest work, so it is not timed). Medians over the rounds; the `## Ingest`
section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import itertools
import os
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
from medtriage.io.ingest_ledger import BATCH_FILES
from medtriage.io.safe_output import sync_folder

SECTION = "## Ingest"
TARGET = 0.80  # ingest on one core, as a share of bare pydicom doing the same decoding (or none) and durable writes
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


def bare_pydicom_durable(files: list[Path], sites: Path, outs: Path, decode: bool, batch: int = 1):
    """Bare pydicom reading (and decoding) every file and writing each durably into `<round>/<site>/`: every input
    ends in one durable file, as in ingest (a file pydicom cannot read is written as its bytes, as ingest copies it
    to the quarantine). `batch`: the folders are fsynced once per that many files and at the end of each site (as
    ingest commits a site's last batch at its end), instead of after each file's rename."""
    rounds = itertools.count()
    names = [(path.relative_to(sites).parts[0], "_".join(path.relative_to(sites).parts[1:])) for path in files]

    def run() -> int:
        out, unsynced = outs / f"round-{next(rounds)}", set()
        for done, (path, (site, name)) in enumerate(zip(files, names), 1):
            folder = out / site
            if unsynced and folder not in unsynced:  # the next site: ingest commits a site's last batch at its end
                sync_all(unsynced)
            folder.mkdir(parents=True, exist_ok=True)
            try:
                dataset = pydicom.dcmread(path)
                if decode:
                    _ = dataset.pixel_array
            except Exception:
                durable_write(folder / name, path.read_bytes())
            else:
                durable_write(folder / name, dataset)
            unsynced.add(folder)
            if done % batch == 0 or done == len(files):
                sync_all(unsynced)
        return len(files)

    def sync_all(folders: set[Path]) -> None:
        for folder in folders:
            sync_folder(folder)
        folders.clear()

    return run


def durable_write(target: Path, data: bytes | pydicom.Dataset) -> None:
    """`data` at `target` all or nothing, its bytes on disk before its name: a temporary file in the same folder,
    written, fsynced, renamed into place. The rename is on disk once the folder is fsynced (`sync_folder`, as ingest's)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    with os.fdopen(handle, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            data.save_as(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, target)


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
        calls_on_one_core = ("read", "read_write", "read_write_batched", "ingest", "decode", "decode_write", "ingest_verify")
        timings = interleaved(
            {
                "read": bare_pydicom(files, decode=False),
                "read_write": bare_pydicom_durable(files, sites, Path(tmp) / "read_write", decode=False),
                "read_write_batched": bare_pydicom_durable(files, sites, Path(tmp) / "batched", decode=False, batch=BATCH_FILES),
                "ingest": ingest(sites, Path(tmp) / "ingest", 1),
                "decode": bare_pydicom(files, decode=True),
                "decode_write": bare_pydicom_durable(files, sites, Path(tmp) / "decode_write", decode=True),
                "ingest_verify": ingest(sites, Path(tmp) / "ingest_verify", 1, verify=True),
                "ingest_all": ingest(sites, Path(tmp) / "ingest_all", len(cores)),
            },
            repeats,
            cpus={name: one for name in calls_on_one_core} | {"ingest_all": every},
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
    plain, decoding = rates["ingest"] / rates["read_write"], rates["ingest_verify"] / rates["decode_write"]
    batched = rates.get("read_write_batched")
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
                f"| (a) bare pydicom `dcmread`, no pixel decoding, nothing written (reference) | {rates['read']:.0f} |",
                "| (b) bare pydicom `dcmread` + a durable write of each file (temporary file in the destination folder, "
                f"write, fsync, rename, fsync the folder) | {rates['read_write']:.0f} |",
                *(
                    [f"| (b2) b with the folder fsynced once per {BATCH_FILES} files, as ingest does (reference) | {batched:.0f} |"]
                    if batched
                    else []
                ),
                "| (c) `medtriage ingest` (keyed hash, screen, structural pixel check, de-identify, durable write, index, "
                f"labels, log) | {rates['ingest']:.0f} |",
                f"| (d) bare pydicom `dcmread` + `pixel_array`, nothing written (reference) | {rates['decode']:.0f} |",
                f"| (e) d + a durable write of each file, as in b | {rates['decode_write']:.0f} |",
                f"| (f) `medtriage ingest --verify-pixels` (c plus a full decode) | {rates['ingest_verify']:.0f} |",
                f"| (g) `medtriage ingest --workers {cores}`, {cores} cores | {rates['ingest_all']:.0f} |",
                "",
                f"Target: ingest on one core at ≥ {TARGET:.0%} of bare pydicom doing the same decoding and writing every "
                "file durably; the verdicts are on c/b and f/e.",
                f"- without decoding, c/b = {plain:.0%}: {verdict(plain >= TARGET)}",
                f"- with decoding, f/e = {decoding:.0%}: {verdict(decoding >= TARGET)}",
                f"- references, no target: c/a = {rates['ingest'] / rates['read']:.0%} and f/d = "
                f"{rates['ingest_verify'] / rates['decode']:.0%} (a and d write nothing)"
                + (f"; c/b2 = {rates['ingest'] / batched:.0%}" if batched else ""),
                f"- {cores} workers without decoding, g/b = {rates['ingest_all'] / rates['read_write']:.0%} (no target)",
                "",
                "b and e write every input once, durably, as ingest does (a file pydicom cannot read as its bytes, as "
                "ingest copies it to the quarantine): each file fsynced before its rename, and its folder fsynced after "
                "it. Ingest fsyncs each pooled file before its rename too, but its folders once per batch of up to "
                f"{BATCH_FILES} files (group commit: then the batch's index rows are appended and the index fsynced, so "
                "the index never names a file that is not on disk); b2 shows b written that way. fsync times move "
                "with the disk's other load, and with them b, e and the ratios. Each round writes into a new, empty "
                "folder; deleting the previous round's output is not timed. Rates move with the load of the machine; "
                "the rounds interleave so that the ratios move less.",
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
