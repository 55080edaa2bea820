"""`medtriage serve` under load: N requests at C concurrent on a mix of real DICOM files (valid and broken,
1 KB to tens of MB) against the real uvicorn server; req/s, p50/p99, responses by code, server RSS.

    python -m benchmarks.serve_load [--requests 10000] [--concurrency 16] [--package DIR] [--url URL --pid PID]

Without --package it exports an untrained ResNet-18 at 224 through the real export path (latency does
not depend on the weights). Without --url it starts `medtriage serve` itself on a free loopback port.
Targets: no error that is not the input's fault (a 5xx, a dropped connection, or a valid file not
answered 200; a 503 under overload counts too), and RSS growth after warm-up of at most 10%.
`--fuzz-examples N` also runs the DICOM fuzzer for N examples per target (the long form of the
CI fuzz test). The `## Serving under load` section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from benchmarks.common import command_line, header, machine, publish, verdict

SECTION = "## Serving under load"
TOKEN = "benchmark-token"
RSS_GROWTH_TARGET = 0.10
DEFAULT_REQUESTS = 10_000
VALID = [
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "emri_small.dcm",
    "US1_J2KR.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "MR_small_RLE.dcm",
    "RG1_J2KR.dcm",
    "RG3_UNCI.dcm",
    "RG1_UNCI.dcm",
    "MR2_UNCI.dcm",
]
NOT_IMAGES = ["rtplan.dcm", "test-SR.dcm"]


def build_mix(folder: Path) -> dict[str, bool]:
    """File -> whether a correct server must score it. Real files, damaged copies of them, and one
    multi-frame file of tens of MB made of a real CR's frames."""
    folder.mkdir(parents=True, exist_ok=True)
    mix: dict[str, bool] = {}
    for name in VALID + NOT_IMAGES:
        path = get_testdata_file(name)
        if path is None:  # pydicom-data files are optional
            continue
        target = folder / name
        target.write_bytes(Path(path).read_bytes())
        mix[str(target)] = name in VALID
    data = (folder / "CT_small.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    flipped = bytearray(Path(get_testdata_file("JPEG2000.dcm")).read_bytes())
    for i in range(len(flipped) - 4000, len(flipped), 7):
        flipped[i] ^= 0xFF
    (folder / "bitflipped_j2k.dcm").write_bytes(bytes(flipped))
    (folder / "not_dicom.dcm").write_bytes(b"%PDF-1.4 not an image\n" * 50)
    (folder / "empty_header.dcm").write_bytes(b"\0" * 128 + b"DICM")
    mix.update({str(folder / n): False for n in ("truncated.dcm", "bitflipped_j2k.dcm", "not_dicom.dcm", "empty_header.dcm")})
    big = _multiframe(get_testdata_file("RG1_UNCI.dcm") or get_testdata_file("MR_small.dcm"), frames=5)
    big_path = folder / "multiframe_cr.dcm"
    big.save_as(big_path, enforce_file_format=True)
    mix[str(big_path)] = True
    return mix


def _multiframe(path: str, frames: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.PixelData = np.repeat(ds.pixel_array[None], frames, axis=0).tobytes()
    ds.NumberOfFrames = frames
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, mix: dict[str, bool], requests: int, concurrency: int, pid: int, warmup: int) -> dict:
    files = sorted(mix)
    rng = random.Random(0)
    plan = [rng.choice(files) for _ in range(requests)]
    bodies = {path: Path(path).read_bytes() for path in files}
    codes: Counter = Counter()
    faults: Counter = Counter()
    latencies: list[float] = []
    rss = {"start": rss_mb(pid)}
    done = 0
    next_index = iter(range(requests))
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        for i in next_index:
            path = plan[i]
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/score", headers=headers, files=[("files", (Path(path).name, bodies[path], "application/dicom"))]
                )
                code = response.status_code
            except httpx.HTTPError as err:
                code = f"transport:{type(err).__name__}"
            latencies.append(time.perf_counter() - started)
            codes[code] += 1
            if not isinstance(code, int) or code >= 500 or (mix[path] and code != 200):
                faults[f"{Path(path).name}:{code}"] += 1
            done += 1
            if done == warmup:
                rss["after_warmup"] = rss_mb(pid)

    async def sample_peak() -> None:
        while True:
            rss["peak"] = max(rss.get("peak", 0.0), rss_mb(pid))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        sampler = asyncio.create_task(sample_peak())
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        sampler.cancel()
    rss["end"] = rss_mb(pid)
    rss.setdefault("after_warmup", rss["end"])
    return {"codes": codes, "faults": faults, "latencies": latencies, "seconds": seconds, "rss": rss}


def start_server(package: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MEDTRIAGE_TOKEN": TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "medtriage.cli", "serve", str(package), "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not come up in 120 s")


def report(result: dict, args: argparse.Namespace, mix: dict[str, bool], server: str) -> str:
    lat = sorted(result["latencies"])
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    rss = result["rss"]
    growth = (rss["end"] - rss["after_warmup"]) / rss["after_warmup"]
    errors = sum(result["faults"].values())
    sizes = sorted(Path(p).stat().st_size for p in mix)
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(result["codes"].items(), key=lambda kv: str(kv[0])))
    smaller = f" (the default is {DEFAULT_REQUESTS:,}; this run used fewer)" if args.requests < DEFAULT_REQUESTS else ""
    lines = [
        SECTION,
        "",
        *header(command_line(), machine()),
        f"- server: {server}",
        f"- load: {args.requests:,} requests{smaller}, {args.concurrency} concurrent, one file per request drawn from "
        f"{len(mix)} files ({sum(mix.values())} valid, {len(mix) - sum(mix.values())} broken or not images; "
        f"{sizes[0]} B to {sizes[-1] / 1e6:.1f} MB); warm-up = first {args.warmup} requests",
        "",
        "| measure | value |",
        "|---|---|",
        f"| throughput | {args.requests / result['seconds']:.1f} req/s ({result['seconds']:.0f} s) |",
        f"| latency p50 / p99 | {1000 * p50:.0f} ms / {1000 * p99:.0f} ms |",
        f"| responses by code | {codes} |",
        f"| RSS start / after warm-up / end (peak) | {rss['start']:.0f} / {rss['after_warmup']:.0f} / "
        f"{rss['end']:.0f} MB ({rss.get('peak', rss['end']):.0f} MB, sampled each second) |",
        f"| RSS growth after warm-up | {100 * growth:+.1f}% (target ≤ {100 * RSS_GROWTH_TARGET:.0f}%): "
        f"{verdict(growth <= RSS_GROWTH_TARGET)} |",
        f"| errors not the input's fault | {errors} (target 0): {verdict(errors == 0)} |",
    ]
    if errors:
        lines.append(f"| of which | {', '.join(f'{k} x{n}' for k, n in result['faults'].most_common(8))} |")
    return "\n".join(lines) + "\n"


def build_package(folder: Path) -> Path:
    from benchmarks.inference import build_package as export_untrained

    package, _ = export_untrained(folder, "resnet18", 224, 2)
    return package


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None, help="requests before the warm-up RSS sample (default N/10)")
    parser.add_argument("--package", type=Path, help="model package to serve (default: an untrained ResNet-18 at 224)")
    parser.add_argument("--url", help="an already running server (then --pid gives its process for RSS)")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--serve-args", default="", help="extra arguments for `medtriage serve`, e.g. '--workers 2'")
    parser.add_argument("--fuzz-examples", type=int, default=0, help="also fuzz every target with this many examples")
    parser.add_argument("--no-publish", action="store_true", help="print the section without writing the docs")
    args = parser.parse_args(argv)
    args.warmup = args.warmup or max(1, args.requests // 10)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        mix = build_mix(Path(scratch) / "files")
        process = None
        if args.url:
            url, pid, server = args.url, args.pid, f"running server at {args.url}"
        else:
            package = args.package or build_package(Path(scratch) / "models")
            process, url = start_server(package, args.serve_args.split())
            model = f"`{args.package}`" if args.package else "an untrained ResNet-18 at 224 px, exported through the real export path"
            pid, server = process.pid, f"`medtriage serve {args.serve_args}`".replace(" `", "`") + f" (uvicorn) serving {model}"
        try:
            result = asyncio.run(load(url, mix, args.requests, args.concurrency, pid, args.warmup))
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=60)
        section = report(result, args, mix, server)
    if args.fuzz_examples:
        section += _fuzz(args.fuzz_examples)
    if args.no_publish:
        print(section)
    else:
        publish(section)
    return 0


def _fuzz(examples: int) -> str:
    """The DICOM fuzz test with more examples per target (MEDTRIAGE_FUZZ_EXAMPLES), run through pytest."""
    env = {**os.environ, "MEDTRIAGE_FUZZ_EXAMPLES": str(examples)}
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz"], env=env, capture_output=True, text=True
    )
    tail = (run.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ").split(" in ")[0]
    return (
        f"\nFuzzing, {examples} examples per target (`MEDTRIAGE_FUZZ_EXAMPLES={examples} pytest tests/fuzz`): "
        f"{tail} in {time.perf_counter() - started:.0f} s; target: no failure: {verdict(run.returncode == 0)}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
