"""Shared by the `scripts/benchmark_*.py` scripts: the machine line, interleaved timing, and
writing one section of docs/benchmarks.md without touching the others. Torch-free."""

from __future__ import annotations

import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"


def command_line() -> str:
    """The command that ran this benchmark, as a reader would type it from the project root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def machine() -> str:
    """CPU model, usable cores, load at the time of the call, Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {cores} cores available{load}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def interleaved_rates(runs: dict[str, tuple[Callable[[], int], list[int]]], repeats: int) -> dict[str, float]:
    """Median items/s per run. `runs` maps a name to (run, cpus): `run()` returns how many items it
    handled and is timed while the process may use only `cpus`. Runs take turns in every round, so a
    busy neighbour slows all of them alike; round 0 warms caches and lazy imports and is not counted."""
    everything = sorted(os.sched_getaffinity(0))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for round_ in range(repeats + 1):
            for name, (run, cpus) in runs.items():
                os.sched_setaffinity(0, cpus)
                start = time.perf_counter()
                n = run()
                if round_:
                    rates[name].append(n / (time.perf_counter() - start))
    finally:
        os.sched_setaffinity(0, everything)
    return {name: statistics.median(values) for name, values in rates.items()}


def publish(section: str, doc: Path = BENCHMARKS_DOC) -> None:
    """Print a benchmark's section and write it into `doc`."""
    print(section)
    write_section(section, doc)


def write_section(section: str, doc: Path = BENCHMARKS_DOC) -> None:
    """Replace the `## Title` section that `section` starts with (or append it); other sections stay."""
    title = section.splitlines()[0].strip()
    if not title.startswith("## "):
        raise ValueError(f"a benchmark section starts with a '## ' heading, got {title!r}")
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\nFigures and the command that reproduces each.\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")
