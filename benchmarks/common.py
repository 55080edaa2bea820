"""What every benchmark shares: where the project is, the command and machine lines, one
interleaved timer (medians), and the writer of a benchmark's section in the docs."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medtriage.io.safe_output import write_atomic

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/ sits at the project root, outside the package
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
NEW_DOC = "# Benchmarks\n\nFigures and the command that reproduces each.\n"


# --- who, where, when -----------------------------------------------------------------------------


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this benchmark, as a reader would type it from the project root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    if script.parent == ROOT / "benchmarks":
        return shlex.join(["python", "-m", f"benchmarks.{script.stem}", *argv[1:]])
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *argv[1:]])


# The load when the benchmark's process started: a section is written after its measurements, whose own load the
# one-minute average would report as the machine's.
START_LOAD = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine() -> str:
    """CPU model, usable cores, load when the process started (START_LOAD), OS, Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    load = f", load average {START_LOAD:.1f} at start" if START_LOAD is not None else ""
    return (
        f"{cpu}, {len(usable_cpus())} cores available{load}, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def today() -> str:
    return dt.date.today().isoformat()


def header(command: str, machine_line: str, extra: str = "", date: str | None = None) -> list[str]:
    """The three lines every section starts with: command, machine, date (of the measurement: today unless given)."""
    return [f"- command: `{command}`", f"- machine: {machine_line}", f"- date: {date or today()}{extra}"]


def verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


# --- the one timer --------------------------------------------------------------------------------


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@dataclass
class Timing:
    """The timed rounds of one call: wall seconds and items handled in each."""

    seconds: list[float] = field(default_factory=list)
    items: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p95_ms(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000

    @property
    def rate(self) -> float:
        """Median items per second over the rounds."""
        return statistics.median(n / max(s, 1e-12) for n, s in zip(self.items, self.seconds))


def interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, cpus: dict[str, set[int]] | None = None
) -> dict[str, Timing]:
    """Time every call `repeats` times, the calls taking turns in each round, so that a busy neighbour
    slows all of them alike. A call returns how many items it handled (anything else counts as 1);
    `cpus` pins a call to those CPUs while it runs. Warm-up rounds (caches, lazy imports) are not counted."""
    everything = set(usable_cpus())
    timings = {name: Timing() for name in calls}
    try:
        for round_ in range(warmup + repeats):
            for name, call in calls.items():
                if cpus and hasattr(os, "sched_setaffinity"):
                    os.sched_setaffinity(0, cpus.get(name, everything))
                start = time.perf_counter()
                handled = call()
                elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    timings[name].seconds.append(elapsed)
                    timings[name].items.append(handled if isinstance(handled, (int, float)) and not isinstance(handled, bool) else 1)
    finally:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, everything)
    return timings


# --- stage results kept between runs ----------------------------------------------------------------


# Settings of a training config that change where a run writes and how fast it goes, not what it computes.
RUN_SETTINGS = ("name", "paths", "tracking", "cv", "trainer.num_threads", "export.name", "export.models_dir")
# Config keys added after stages were kept, with the value that leaves a recipe as it was: dropped from the key at that
# value, so a recipe that does not use them keeps the key (and the kept stages) it had.
ADDED_SETTINGS = {"data.refit": False}


def recipe_key(cfg) -> str:
    """A composed training config as the stage caches know it: every value as written (interpolations unresolved, so
    the same on every machine), less RUN_SETTINGS. Keyed by this rather than by the command's overrides, a stage
    reruns when a config file changes under the same command, and is found again under any command that composes
    the same recipe."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    dropped = [*RUN_SETTINGS, *(d for d, off in ADDED_SETTINGS.items() if OmegaConf.select(cfg, d) == off)]
    for dotted in dropped:
        *parents, leaf = dotted.split(".")
        node = recipe
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return json.dumps(recipe, sort_keys=True)


def stage_file(out_dir: Path, kind: str, key: list[str]) -> Path:
    """Where a benchmark stage's result is kept: `<kind>-<hash of key>.json`; the key names everything the result
    depends on (a `recipe_key`, run ids, views)."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return out_dir / f"{kind}-{digest}.json"


def cached(path: Path, compute) -> dict:
    """`compute()`'s result, stored as JSON at `path` (atomically) and read back on later runs."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_atomic(path, json.dumps(result, indent=2, default=str).encode())
    return result


# --- writing the docs -----------------------------------------------------------------------------


def joined_since(labels: list[str], first: str) -> list[str]:
    """The candidates from `first` on, in the order they joined (none when `first` is not among them): those judged
    after an earlier choice had been scored on test."""
    return labels[labels.index(first) :] if first in labels else []


def mean_sd_text(values: list[float], digits: int = 4, signed: bool = False) -> str:
    """A table cell: "mean ± sd", or the mean alone for one value."""
    from medtriage.evaluation.bootstrap import mean_sd

    mean, sd = mean_sd(values)
    shown = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{shown} ± {sd:.{digits}f}" if len(values) > 1 else shown


def publish(section: str, doc: Path = BENCHMARKS_DOC) -> None:
    """Print a benchmark's section and write it into `doc`."""
    print(section)
    write_section(section, doc)


def write_section(section: str, doc: Path = BENCHMARKS_DOC) -> None:
    """Replace the `## Title` section that `section` starts with (or append it); other sections stay.
    The file is replaced atomically (temp + rename)."""
    title = section.splitlines()[0].strip()
    if not title.startswith("## "):
        raise ValueError(f"a benchmark section starts with a '## ' heading, got {title!r}")
    text = doc.read_text() if doc.is_file() else NEW_DOC
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    _replace(doc, text.rstrip("\n") + "\n")


def _replace(doc: Path, text: str) -> None:
    doc.parent.mkdir(parents=True, exist_ok=True)
    temporary = doc.with_name(f".{doc.name}.tmp")
    temporary.write_text(text)
    temporary.replace(doc)
