"""Peak memory of reading a Deflated Explicit VR Little Endian file, next to the same image not deflated.

    python -m benchmarks.deflated_reads [--frames 4] [--side 8192] [--bulk-mib 1000] [--repeats 3] [--quick] [--doc FILE]

pydicom inflates a deflated data set whole into one buffer and then copies its elements out of it, so a deflated
file cost about twice its inflated size to read; `medtriage.io.clamped.read_part10` reads it as it inflates. This
benchmark builds, in a temporary folder deleted afterwards, without ever holding them inflated:
- image: FRAMES x SIDE x SIDE 16-bit MONOCHROME2 (default 4 x 8192 x 8192 = 512 MiB of pixels), deflated;
- plain: the same image, Explicit VR Little Endian (not deflated): the baseline;
- bulk: a private OB element of BULK MiB (default 1000) before a 1024 x 1024 16-bit image, deflated only: more
  than `read_header` reads before the pixels, so the SR builder refuses it; its outcome is reported as measured.
Each read runs in a fresh process, started by a small launcher that reports its peak resident memory (os.wait4's
ru_maxrss): a process started straight from this one would inherit this one's high-water mark. The reads:
- data set: `bounded_source` + `read_part10`, as `read_dicom` reads the file before decoding it;
- read_dicom: the decode `medtriage score` runs (`Predictor.score_file`), float32 pixels out;
- read_header: the header the SR builder (`medtriage.serve.dicom_results`) references, no pixels;
- pydicom.dcmread: pydicom alone, for reference (no target): a deflated data set inflated whole, then read;
- imports: the imports every read's process makes, and no read (the floor of every peak).
Repetitions interleave (every read of every file, then again); medians. Target, for each read of the image:
deflated peak <= 1.1 x the plain peak, both measured in the same run.
--quick: a 2 x 1024 x 1024 image and a 40 MiB bulk element, one repetition (a smoke run, not assessed), written to
outputs/benchmark_deflated_reads_quick.md unless --doc is given. Otherwise the `## Deflated reads` section of
docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BENCHMARKS_DOC, ROOT, command_line, header, machine, verdict, write_section

SECTION = "## Deflated reads"
TARGET = 1.1  # deflated peak / plain peak, each read
MiB = 1 << 20
BLOCK = 16 * MiB  # a stand-alone deflate block of this many inflated bytes, repeated
RAMP = struct.pack("<256H", *range(0, 4096, 16))  # 512 bytes of a 12-bit ramp: the pixels, repeated
READS = ("data set", "read_dicom", "read_header")  # judged against the target
REFERENCE = "pydicom.dcmread"  # no target: how pydicom alone reads the same files (a deflated data set inflated whole)
READ_WORDS = {
    "data set": "data set: `bounded_source` + `read_part10`, as `read_dicom` reads the file before decoding it",
    "read_dicom": "read_dicom: the decode `medtriage score` runs (`Predictor.score_file`), float32 pixels out",
    "read_header": "read_header: the header the SR builder references (`medtriage.serve.dicom_results.read_header`), no pixels",
    REFERENCE: "pydicom.dcmread: pydicom alone, for reference (no target)",
}
QUICK = {"frames": 2, "side": 1024, "bulk_mib": 40, "repeats": 1}


# --- the files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A 16-bit MONOCHROME2 image of `frames` x `side` x `side`, `bulk` bytes of a private OB element before its pixels."""

    name: str
    frames: int
    side: int
    bulk: int = 0
    deflated: bool = True

    @property
    def pixel_bytes(self) -> int:
        return self.frames * self.side * self.side * 2

    @property
    def inflated_mib(self) -> float:
        return (self.pixel_bytes + self.bulk) / MiB


def explicit_little(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def repeated(pattern: bytes, size: int) -> bytes:
    """`size` bytes of `pattern` repeated, deflated as one stand-alone block repeated (never held inflated)."""
    if BLOCK % len(pattern) or size % len(pattern):
        raise ValueError(f"{size} bytes are not whole repeats of a {len(pattern)}-byte pattern")

    def block(n: int) -> bytes:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflate.compress(pattern * (n // len(pattern))) + deflate.flush(zlib.Z_FULL_FLUSH)

    whole, rest = divmod(size, BLOCK)
    return block(BLOCK) * whole + (block(rest) if rest else b"")


def build(spec: Spec, folder: Path) -> Path:
    """The file of `spec` in `folder`: its data set deflated, or (not deflated) inflated to disk piece by piece."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if spec.deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "P1", "DX"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", spec.side, spec.side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if spec.frames > 1:
        ds.NumberOfFrames = spec.frames
    if spec.bulk:
        ds.add_new(0x00290010, "LO", "BULK")
    body = io.BytesIO()
    outer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body.write(outer.compress(explicit_little(ds)) + outer.flush(zlib.Z_FULL_FLUSH))
    if spec.bulk:
        body.write(outer.compress(struct.pack("<HH2sHL", 0x0029, 0x1010, b"OB", 0, spec.bulk)) + outer.flush(zlib.Z_FULL_FLUSH))
        body.write(repeated(b"\x5a" * 512, spec.bulk))
    body.write(outer.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, spec.pixel_bytes)) + outer.flush(zlib.Z_FULL_FLUSH))
    body.write(repeated(RAMP, spec.pixel_bytes))
    body.write(outer.flush())
    path = folder / f"{spec.name}.dcm"
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        if spec.deflated:
            out.write(body.getvalue())
        else:
            inflate, data = zlib.decompressobj(-zlib.MAX_WBITS), body.getvalue()
            while data:
                out.write(inflate.decompress(data, BLOCK))
                data = inflate.unconsumed_tail
    return path


# --- one read in a fresh process --------------------------------------------------------------------


# Runs the measured process and prints its output, then its peak RSS in KiB (Linux carries a parent's high-water
# mark over fork and exec: the launcher is small, this benchmark may not be).
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
out = child.stdout.read()
_, status, usage = os.wait4(child.pid, 0)
print(out.strip())
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def child(read: str, path: str) -> None:
    """In the measured process: the imports of every read (the floor), then `read` of `path`; prints its outcome and
    seconds as JSON. A refusal (a MedTriageError) is an outcome; anything else fails the benchmark."""
    import time

    import pydicom

    from medtriage.errors import MedTriageError
    from medtriage.io.clamped import bounded_source, read_part10
    from medtriage.io.decode_limits import default_limits
    from medtriage.io.dicom import read_dicom
    from medtriage.serve.dicom_results import read_header

    def data_set() -> str:
        with bounded_source(path, path) as fp:
            ds = read_part10(fp, path, default_limits())
        if "PixelData" not in ds:
            raise AssertionError("the data set read has no Pixel Data")
        return f"read ({len(ds.PixelData) / MiB:.0f} MiB of Pixel Data)"

    def decoded() -> str:
        image = read_dicom(path)
        return f"decoded ({' x '.join(map(str, image.pixels.shape))} {image.pixels.dtype})"

    def header_only() -> str:
        found = read_header(path)
        if "PixelData" in found or found.PatientID != "P1":
            raise AssertionError("read_header returned pixels, or not the header written")
        return "read (no pixels)"

    def pydicom_alone() -> str:
        ds = pydicom.dcmread(path)
        return f"read ({len(ds.PixelData) / MiB:.0f} MiB of Pixel Data)"

    calls = {
        "imports": lambda: "imports only",
        "data set": data_set,
        "read_dicom": decoded,
        "read_header": header_only,
        REFERENCE: pydicom_alone,
    }
    start = time.perf_counter()
    try:
        outcome = calls[read]()
    except MedTriageError as err:
        outcome = f"refused: {type(err).__name__}: {err.reason}"  # without the (temporary) path
    print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start}))


def measure_once(read: str, path: Path | None) -> dict:
    """Peak RSS (MiB), seconds and outcome of `read` of `path` in a fresh process."""
    code = "import sys; from benchmarks.deflated_reads import child; child(sys.argv[1], sys.argv[2])"
    run = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, "-c", code, read, str(path or "")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    lines = run.stdout.strip().splitlines()
    if run.returncode or len(lines) < 2:
        raise RuntimeError(f"{read} of {path} failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
    result = json.loads(lines[-2])
    return {"peak": int(lines[-1]) / 1024, "seconds": result["seconds"], "outcome": result["outcome"]}


@dataclass
class Measured:
    peaks: list[float]
    seconds: list[float]
    outcomes: list[str]

    @property
    def peak(self) -> float:
        return statistics.median(self.peaks)

    @property
    def time(self) -> float:
        return statistics.median(self.seconds)

    @property
    def outcome(self) -> str:
        return " / ".join(dict.fromkeys(self.outcomes))  # one, unless repetitions disagreed


def measure(specs: list[Spec], repeats: int) -> dict:
    """{(file name, read): Measured}, ("imports", "") for the floor; each repetition runs every read of every file,
    the files' order alternating between repetitions."""
    found: dict[tuple[str, str], Measured] = {}
    with tempfile.TemporaryDirectory(prefix="deflated_reads-") as tmp:
        paths = {spec.name: build(spec, Path(tmp)) for spec in specs}
        on_disk = {name: path.stat().st_size / MiB for name, path in paths.items()}
        for rep in range(repeats):
            runs = [("imports", "", None)] + [(read, name, path) for read in (*READS, REFERENCE) for name, path in paths.items()]
            for read, name, path in runs if rep % 2 == 0 else runs[::-1]:
                one = measure_once(read, path)
                print(
                    f"  [{rep + 1}/{repeats}] {read:12s} {name or '-':6s} peak {one['peak']:7.0f} MiB  {one['seconds']:6.1f} s  {one['outcome']}"
                )
                kept = found.setdefault((name, read), Measured([], [], []))
                kept.peaks.append(one["peak"])
                kept.seconds.append(one["seconds"])
                kept.outcomes.append(one["outcome"])
    return {"measured": found, "on_disk": on_disk}


# --- the section ------------------------------------------------------------------------------------


def mib(difference: float) -> str:
    """A difference of peaks in whole MiB ("0", not "-0", for one a little under the floor)."""
    return str(round(difference))


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(result: dict, specs: list[Spec], repeats: int, quick: bool, command: str, machine_line: str, header_budget: int) -> str:
    measured, on_disk = result["measured"], result["on_disk"]
    floor = measured[("", "imports")]
    image, plain, bulk = specs
    described = {
        image.name: f"{image.frames} x {image.side} x {image.side} 16-bit, deflated",
        plain.name: "the same image, not deflated: the baseline",
        bulk.name: f"{bulk.bulk / MiB:.0f} MiB private OB + {bulk.frames} x {bulk.side} x {bulk.side} 16-bit, deflated",
    }
    lines = [
        SECTION,
        "",
        *header(command, machine_line),
        (
            f"- files: {', '.join(f'{n} = {d} ({s.inflated_mib:.0f} MiB inflated, {on_disk[n]:.2f} MiB on disk)' for (n, d), s in zip(described.items(), specs, strict=True))}; "
            "built without ever being held inflated, in a temporary folder deleted afterwards"
        ),
        "- reads: " + "; ".join(READ_WORDS[r] for r in (*READS, REFERENCE)),
        (
            "- each read in a fresh process (peak RSS from `os.wait4` through a small launcher); "
            f"{f'medians of {repeats} interleaved repetitions' if repeats > 1 else 'one repetition'}; the processes' imports alone peak at {floor.peak:.0f} MiB, which every "
            f"peak includes; `read_header` reads at most {header_budget / MiB:.0f} MiB before the pixels; seconds: the read alone, "
            "median wall time (no target: the machine's load moves them)"
        ),
        "",
        "| read | file | outcome | peak MiB | above imports MiB | seconds |",
        "|---|---|---|---:|---:|---:|",
        f"| imports only | — | — | {floor.peak:.0f} | 0 | {floor.time:.1f} |",
    ]
    for read in (*READS, REFERENCE):
        for spec in specs:
            m = measured[(spec.name, read)]
            lines.append(f"| {read} | {spec.name} | {cell(m.outcome)} | {m.peak:.0f} | {mib(m.peak - floor.peak)} | {m.time:.1f} |")
    lines += ["", f"Target, each read: image (deflated) peak ≤ {TARGET} × plain peak, measured in the same run."]
    for read in (*READS, REFERENCE):
        deflated, baseline = measured[(image.name, read)], measured[(plain.name, read)]
        ratio = deflated.peak / baseline.peak
        grown, grown_plain = deflated.peak - floor.peak, baseline.peak - floor.peak
        above = f" = {grown / grown_plain:.2f}" if grown_plain >= 1 else ""  # no ratio of a baseline within a MiB of the floor
        judged = (
            "reference, no target"
            if read == REFERENCE
            else "not assessed (a --quick smoke run: its small image leaves the imports most of every peak)"
            if quick
            else verdict(ratio <= TARGET)
        )
        lines.append(
            f"- {read}: {deflated.peak:.0f} / {baseline.peak:.0f} MiB = {ratio:.2f}: {judged} "
            f"(above the imports: {mib(grown)} / {mib(grown_plain)} MiB{above})"
        )
    bulk_lines = []
    for read in (*READS, REFERENCE):
        m = measured[(bulk.name, read)]
        bulk_lines.append(
            f"{read} ({m.outcome.split()[0].rstrip(':')}) {mib(m.peak - floor.peak)} MiB above the imports ({(m.peak - floor.peak) / bulk.inflated_mib:.2f} × inflated)"
        )
    lines += [
        "",
        (f"Bulk ({bulk.inflated_mib:.0f} MiB inflated, no target; its outcomes are in the table): " + "; ".join(bulk_lines) + "."),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4, help="frames of the image (default %(default)s)")
    parser.add_argument("--side", type=int, default=8192, help="rows = columns of the image, a multiple of 16 (default %(default)s)")
    parser.add_argument("--bulk-mib", type=int, default=1000, help="MiB of the private element of the bulk file (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument(
        "--doc", type=Path, default=None, help="markdown file to update (default: docs/benchmarks.md; outputs/ with --quick)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    from medtriage.serve.dicom_results import SR_HEADER_READ_BYTES

    specs = [
        Spec("image", args.frames, args.side),
        Spec("plain", args.frames, args.side, deflated=False),
        Spec("bulk", 1, 1024, bulk=args.bulk_mib * MiB),
    ]
    where = machine()  # its load average is the one at the start
    import pydicom

    text = markdown(
        measure(specs, args.repeats),
        specs,
        args.repeats,
        args.quick,
        command_line(),
        f"{where}, pydicom {pydicom.__version__}",
        SR_HEADER_READ_BYTES,
    )
    doc = args.doc or (ROOT / "outputs" / "benchmark_deflated_reads_quick.md" if args.quick else BENCHMARKS_DOC)
    print(text)
    write_section(text, doc)
    print(f"section written to {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
