import pytest

from medtriage.benchmarking import ROOT, command_line, interleaved_rates, machine, write_section


def test_write_section_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Ingest\n\ningest rows\n\n## Accuracy\n\nold table\n\n## Inference\n\ninference rows\n")
    write_section("## Accuracy\n\nnew table\n", doc)
    text = doc.read_text()
    assert "old table" not in text and "new table" in text and "inference rows" in text
    assert text.index("## Ingest") < text.index("## Accuracy") < text.index("## Inference")
    write_section("## Accuracy\n\nnew table\n", doc)
    assert doc.read_text() == text


def test_write_section_appends_to_a_new_document(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    write_section("## Training\n\nrows\n", doc)
    assert doc.read_text().startswith("# Benchmarks") and doc.read_text().endswith("## Training\n\nrows\n")


def test_a_section_needs_a_heading(tmp_path):
    with pytest.raises(ValueError, match="heading"):
        write_section("no heading\n", tmp_path / "b.md")


def test_interleaved_rates_counts_items_per_second():
    rates = interleaved_rates({"a": (lambda: 10, [0]), "b": (lambda: 20, [0])}, repeats=2)
    assert set(rates) == {"a", "b"} and all(r > 0 for r in rates.values())
    assert "cores available" in machine()


def test_command_line_is_what_a_reader_types_from_the_project_root(monkeypatch):
    monkeypatch.setattr("sys.argv", [str(ROOT / "scripts" / "benchmark_inference.py"), "--threads", "1", "a b.dcm"])
    assert command_line() == "python scripts/benchmark_inference.py --threads 1 'a b.dcm'"
