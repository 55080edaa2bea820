"""docs/safety.md's figures are the section benchmarks.safety writes, with its command, machine, date and verdicts."""

from tests.benchmarks.test_docs_figures import ROOT, check_section, sections, written_sections


def test_the_safety_figures_are_script_written():
    writers = written_sections()
    title = next(t for t, m in writers.items() if m == "safety")
    _, found = sections((ROOT / "docs" / "safety.md").read_text())
    assert title in found and check_section(title, found[title], writers) == []
