"""Dynamic batching in `medtriage serve`: throughput and latency at 16 concurrent clients, batching off vs on.

    python -m benchmarks.batching [--package DIR] [--file CT_small.dcm] [--concurrency 16] [--requests 160]
                                  [--rounds 5] [--max-batch 16] [--batch-wait-ms 5] [--threads N]

Two `medtriage serve` processes of the same package with the same options except `--max-batch`
(1 = off), started in the same run; rounds alternate between them, each round sending --requests
POST /v1/score of one real DICOM file from --concurrency clients. Throughput is the median over rounds;
latency percentiles pool every request. Target: batching on >= 2x the throughput of batching off.
Without --package it uses models/pneumoniamnist-r10-28, or exports an untrained ResNet-18 at 224.
The `## Dynamic batching` section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from pydicom.data import get_testdata_file

from benchmarks.common import (
    BENCHMARKS_DOC,
    ROOT,
    command_line,
    header,
    machine,
    publish,
    verdict,
)
from benchmarks.serve_load import TOKEN, start_server

SECTION = "## Dynamic batching"
THROUGHPUT_TARGET = 2.0
DEFAULT_PACKAGE = ROOT / "models" / "pneumoniamnist-r10-28"


async def one_round(url: str, body: bytes, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """(requests/s, per-request seconds) of `requests` POSTs from `concurrency` clients; every answer must be 200."""
    latencies: list[float] = []
    todo = iter(range(requests))
    headers = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/dicom"}

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in todo:
            started = time.perf_counter()
            response = await client.post("/v1/score", content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"the server answered {response.status_code}: {response.text[:300]}")
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return requests / (time.perf_counter() - started), latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(package: Path, file: str, args: argparse.Namespace) -> dict:
    body = Path(file).read_bytes()
    # Both admit every client at once: batching on would otherwise get more requests in flight than off.
    common = ["--allow-out-of-scope", "--max-concurrent", str(args.concurrency)] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    settings = {"off": ["--max-batch", "1"], "on": ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]}
    servers = {name: start_server(package, common + extra) for name, extra in settings.items()}
    rates: dict[str, list[float]] = {name: [] for name in servers}
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _, url in servers.values():  # warm-up round, not counted
            asyncio.run(one_round(url, body, args.concurrency, args.concurrency))
        for _ in range(args.rounds):
            for name, (_, url) in servers.items():
                rate, seconds = asyncio.run(one_round(url, body, args.requests, args.concurrency))
                rates[name].append(rate)
                latencies[name] += seconds
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    return {
        name: {
            "rate": statistics.median(rates[name]),
            "rates": rates[name],
            "p50": percentile(latencies[name], 0.5),
            "p99": percentile(latencies[name], 0.99),
        }
        for name in servers
    }


def markdown(result: dict, args: argparse.Namespace, package: str, file: str, machine_line: str) -> str:
    off, on = result["off"], result["on"]
    ratio = on["rate"] / off["rate"]
    lines = [
        SECTION,
        "",
        *header(command_line(), machine_line),
        (
            f"- model: {package}; each request: POST /v1/score with one DICOM file ({Path(file).name}), "
            f"{args.concurrency} concurrent clients, {args.rounds} rounds of {args.requests} requests per server, "
            "servers taking turns; one warm-up round each"
        ),
        (
            f"- servers: two `medtriage serve` processes, the same options (`--max-concurrent {args.concurrency}`) except batching "
            f"(off: `--max-batch 1`; on: `--max-batch {args.max_batch} --batch-wait-ms {args.batch_wait_ms}`)"
        ),
        "",
        "| batching | requests/s (median of rounds) | rounds | latency p50 | latency p99 |",
        "|---|---|---|---|---|",
    ]
    for name in ("off", "on"):
        r = result[name]
        lines.append(
            f"| {name} | {r['rate']:.1f} | {', '.join(f'{x:.1f}' for x in r['rates'])} | "
            f"{1000 * r['p50']:.0f} ms | {1000 * r['p99']:.0f} ms |"
        )
    lines += [
        "",
        (
            f"Batching on serves **{ratio:.2f}x** the requests per second of batching off "
            f"(target ≥ {THROUGHPUT_TARGET}x): {verdict(ratio >= THROUGHPUT_TARGET)}."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=None)
    parser.add_argument("--file", default="CT_small.dcm", help="a pydicom test file name or a path")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160, help="requests per round and server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads of both servers")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_DOC)
    args = parser.parse_args(argv)
    file = args.file if Path(args.file).is_file() else get_testdata_file(args.file)
    machine_line = machine()
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or (DEFAULT_PACKAGE if DEFAULT_PACKAGE.is_dir() else _untrained(Path(tmp)))
        from medtriage.serve.package import load_package

        described = load_package(package).describe()
        result = run(package, file, args)
    publish(markdown(result, args, described, file, machine_line), args.doc)
    return 0


def _untrained(folder: Path) -> Path:
    from benchmarks.serve_load import build_package

    return build_package(folder)


if __name__ == "__main__":
    raise SystemExit(main())
