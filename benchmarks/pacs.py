"""The DICOM node against a real PACS: N CR instances (several studies) sent through `medtriage listen`
(receive, score, one SR per study delivered to Orthanc) against the same instances sent with dcmtk
storescu straight to Orthanc, in the same run, on the same machine.

    python -m benchmarks.pacs [--instances 200] [--studies 10] [--size 224] [--study-timeout 2] [--package DIR]

Each study goes in one association, as a modality sends it; the straight run goes first, into its own
Orthanc. Rates: instances / wall time. For the node, the configured quiet period (--study-timeout) is
waiting, not work, so the end-to-end rate is N / (time to the last SR in Orthanc - study timeout).
Latency: from the end of a study's association (its last instance acknowledged) to its SR stored in
Orthanc (polled every 50 ms). Targets: node rate at least half the straight rate; p95 latency at most
study timeout + 2 s. Without --package, the small test package is exported first (needs torch).
The `## DICOM node (PACS round trip)` section of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pydicom

from benchmarks.common import command_line, header, machine, publish, verdict
from tests.serve.node.peers import ORTHANC_AET, Listener, Orthanc, cr_study, free_port, storescu

SECTION = "## DICOM node (PACS round trip)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def send_studies(port: int, studies: list[list[Path]], aet: str) -> tuple[float, dict[str, float]]:
    """storescu each study in its own association; total seconds and the end time of each study's send."""
    ended: dict[str, float] = {}
    start = time.perf_counter()
    for files in studies:
        run = storescu("storescu", port, files, aet=aet)
        if run.returncode != 0:
            raise RuntimeError(f"storescu failed: {run.stderr[-500:]}")
        ended[pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID] = time.perf_counter()
    return time.perf_counter() - start, ended


def watch_srs(orthanc: Orthanc, expected: set[str], stop: threading.Event) -> dict[str, float]:
    """When each study's SR first shows up in Orthanc (perf_counter seconds); one cheap query per poll."""
    seen: dict[str, float] = {}
    study_uids: dict[str, str] = {}  # Orthanc study ID -> Study Instance UID
    while not stop.is_set() and len(seen) < len(expected):
        now = time.perf_counter()
        for series in orthanc.find("Series", Modality="SR"):
            parent = series["ParentStudy"]
            if parent not in study_uids:
                study_uids[parent] = orthanc.http.get(f"/studies/{parent}").json()["MainDicomTags"]["StudyInstanceUID"]
            uid = study_uids[parent]
            if uid in expected and uid not in seen:
                seen[uid] = now
        stop.wait(0.05)
    return seen


def run(package: Path, instances: int, studies: int, size: int, study_timeout: float, work: Path) -> dict:
    per_study = instances // studies
    data = [cr_study(work / "data" / f"s{i}", per_study, seed=100 + i, size=size) for i in range(studies)]
    n = per_study * studies

    straight = Orthanc(_folder(work / "straight"), free_port()).start()
    try:
        straight_seconds, _ = send_studies(straight.dicom_port, data, ORTHANC_AET)
        assert len(straight.find()) == n, "Orthanc did not store every instance"
    finally:
        straight.close()

    node_port = free_port()
    pacs = Orthanc(_folder(work / "pacs"), node_port).start()
    node = Listener(
        package, work / "state", node_port, "--send-to", f"{ORTHANC_AET}@127.0.0.1:{pacs.dicom_port}", "--study-timeout", str(study_timeout)
    ).start()
    try:
        uids = {pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID for files in data}
        stop = threading.Event()
        arrivals: dict[str, float] = {}
        watcher = threading.Thread(target=lambda: arrivals.update(watch_srs(pacs, uids, stop)), daemon=True)
        start = time.perf_counter()
        watcher.start()
        receive_seconds, ended = send_studies(node_port, data, "MEDTRIAGE")
        watcher.join(timeout=study_timeout * 4 + 120)
        stop.set()
        if len(arrivals) < len(uids):
            raise RuntimeError(f"only {len(arrivals)} of {len(uids)} SRs reached Orthanc")
        end_to_end = max(arrivals.values()) - start
        deadline = time.monotonic() + 10  # the node records "delivered" just after Orthanc has the SR
        while node.counts()["studies"].get("delivered", 0) < len(uids) and time.monotonic() < deadline:
            time.sleep(0.1)
        counts = node.counts()
    finally:
        node.stop()
        pacs.close()
    latencies = [arrivals[uid] - ended[uid] for uid in uids]
    return {
        "n": n,
        "studies": studies,
        "per_study": per_study,
        "size": size,
        "timeout": study_timeout,
        "straight_rate": n / straight_seconds,
        "receive_rate": n / receive_seconds,
        "node_rate": n / max(end_to_end - study_timeout, 1e-9),
        "end_to_end": end_to_end,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "counts": counts,
    }


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def markdown(r: dict, command: str, machine_line: str) -> str:
    rate_ok = r["node_rate"] >= r["straight_rate"] / 2
    latency_ok = r["p95"] <= r["timeout"] + 2
    return "\n".join(
        [
            SECTION,
            "",
            *header(command, machine_line),
            f"- work: {r['n']} CR instances ({r['size']}x{r['size']}, 8-bit, uncompressed) in {r['studies']} studies of "
            f"{r['per_study']}, each study in one storescu association; the node runs with --study-timeout {r['timeout']:g} "
            "--threads 1 and the small test model package; Orthanc (Debian package, default storage) on loopback",
            f"- node state at the end: {r['counts']}",
            "",
            "| path | instances/s |",
            "|---|---|",
            f"| storescu → Orthanc (straight) | {r['straight_rate']:.1f} |",
            f"| storescu → MedTriage, received (spooled + committed) | {r['receive_rate']:.1f} |",
            f"| storescu → MedTriage → SR in Orthanc, end to end less the study timeout | {r['node_rate']:.1f} |",
            "",
            f"- last instance of a study → its SR stored in Orthanc: p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s",
            f"- node rate ≥ half the straight rate ({r['node_rate']:.1f} vs {r['straight_rate'] / 2:.1f}): {verdict(rate_ok)}",
            f"- p95 latency ≤ study timeout + 2 s ({r['p95']:.2f} s vs {r['timeout'] + 2:g} s): {verdict(latency_ok)}",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (a multiple of 28)")
    parser.add_argument("--study-timeout", type=float, default=2.0)
    parser.add_argument("--package", type=Path, default=None, help="model package (default: export the small test package)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="medtriage-pacs-"))
    try:
        package = args.package
        if package is None:
            from tests.export.tiny_package import build_tiny_package

            package = build_tiny_package(work / "models")[0].package_dir
        machine_line = machine()
        result = run(package, args.instances, args.studies, args.size, args.study_timeout, work)
        publish(markdown(result, command_line(), machine_line))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
