"""Figures in the docs come from scripts: every section of docs/benchmarks.md (and the stain comparison in
docs/pathology.md) is one that a benchmark module writes, carrying its command, machine, date and verdicts;
every command the README and docs cite exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def written_sections() -> dict[str, str]:
    """{'## Title': module name} from the `SECTION = "## ..."` constant of each benchmarks module."""
    found = {}
    for path in (ROOT / "benchmarks").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SECTION" for t in node.targets):
                found[node.value.value] = path.stem
    return found


def sections(text: str) -> tuple[str, dict[str, str]]:
    """(text before the first `## ` heading, {heading: body})."""
    parts = re.split(r"^(## .*)$", text, flags=re.MULTILINE)
    return parts[0], {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def check_section(title: str, body: str, writers: dict[str, str]) -> list[str]:
    module = writers.get(title)
    if module is None:
        return [f"{title}: no benchmark writes this section"]
    needed = [f"- command: `python -m benchmarks.{module}", "- machine: ", "- date: "]
    problems = [f"{title}: missing {n!r}" for n in needed if n not in body]
    if not re.search(r"\*\*met\*\*|\*\*not met\*\*|not assessed|highest mean", body):
        problems.append(f"{title}: no verdict")
    return problems


def test_every_figure_in_benchmarks_md_sits_in_a_script_written_section():
    writers = written_sections()
    preamble, found = sections((ROOT / "docs" / "benchmarks.md").read_text())
    assert not re.search(r"\d", preamble), "figures above the first section are not written by any benchmark"
    problems = [p for title, body in found.items() for p in check_section(title, body, writers)]
    assert problems == []


def test_the_stain_comparison_in_pathology_md_is_script_written():
    writers = written_sections()
    _, found = sections((ROOT / "docs" / "pathology.md").read_text())
    title = next(t for t, m in writers.items() if m == "pathology_stains")
    assert title in found and check_section(title, found[title], writers) == []


def test_the_section_check_can_fail():
    writers = {"## Ingest": "ingest"}
    assert check_section("## Ingest", "- command: `python -m benchmarks.ingest`\n- machine: x\n- date: y\n", writers) == [
        "## Ingest: no verdict"
    ]
    assert check_section("## Typed by hand", "| a | 3 |", writers) == ["## Typed by hand: no benchmark writes this section"]


def test_cited_commands_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        missing += [
            f"{doc.name}: benchmarks.{m}"
            for m in re.findall(r"python -m benchmarks\.(\w+)", text)
            if not (ROOT / "benchmarks" / f"{m}.py").is_file()
        ]
        missing += [f"{doc.name}: {s}" for s in re.findall(r"\b(scripts/[\w/]+\.(?:py|sbatch))", text) if not (ROOT / s).is_file()]
    assert missing == []
