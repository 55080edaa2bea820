"""The shared benchmark helper: section writer, the one timer, command and machine lines."""

import pytest

from benchmarks.common import (
    ROOT,
    Timing,
    command_line,
    interleaved,
    machine,
    verdict,
    write_section,
)


def test_write_section_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Ingest\n\ningest rows\n\n## Accuracy\n\nold table\n\n## Inference\n\ninference rows\n")
    write_section("## Accuracy\n\nnew table\n", doc)
    text = doc.read_text()
    assert "old table" not in text and "new table" in text and "inference rows" in text
    assert text.index("## Ingest") < text.index("## Accuracy") < text.index("## Inference")
    write_section("## Accuracy\n\nnew table\n", doc)
    assert doc.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]  # no temporary file left behind


def test_write_section_appends_to_a_new_document(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    write_section("## Training\n\nrows\n", doc)
    assert doc.read_text().startswith("# Benchmarks") and doc.read_text().endswith("## Training\n\nrows\n")


def test_a_section_needs_a_heading(tmp_path):
    with pytest.raises(ValueError, match="heading"):
        write_section("no heading\n", tmp_path / "b.md")


def test_interleaved_takes_turns_skips_warmup_and_counts_items():
    calls = []

    def call(name, items):
        def run():
            calls.append(name)
            return items

        return run

    timings = interleaved({"a": call("a", 10), "b": call("b", None)}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, turn by turn
    assert len(timings["a"].seconds) == 3 and timings["a"].items == [10] * 3 and timings["b"].items == [1] * 3
    assert timings["a"].rate > 0 and timings["a"].p95_ms >= timings["a"].median_ms >= 0


def test_timing_medians_and_rates():
    timing = Timing(seconds=[0.1, 0.3, 0.2], items=[10, 30, 10])
    assert timing.median_ms == pytest.approx(200.0)
    assert timing.rate == pytest.approx(100.0)  # per round: 100, 100, 50 items/s
    assert timing.p95_ms == pytest.approx(300.0)


def test_command_line_is_what_a_reader_types_from_the_project_root():
    module = ROOT / "benchmarks" / "inference.py"
    assert command_line([str(module), "--threads", "1", "a b.dcm"]) == "python -m benchmarks.inference --threads 1 'a b.dcm'"
    assert command_line([str(ROOT / "scripts" / "train.py"), "x=1"]) == "python scripts/train.py x=1"


def test_machine_and_verdict_lines():
    assert "cores available" in machine()
    assert verdict(True) == "**met**" and verdict(False) == "**not met**"


def test_the_machine_line_gives_the_load_before_the_measurements_not_theirs(monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))  # the benchmark's own load, by the time it writes
    assert "cores available" in machine() and "load average 99.0" not in machine()


def test_a_stage_is_keyed_by_the_recipe_a_command_composes_not_by_its_words():
    from benchmarks.common import recipe_key
    from medtriage.config import compose_train_config

    def key(*overrides):
        return recipe_key(compose_train_config(["experiment=pneumoniamnist_sota", *overrides]))

    stands = key("paths.output_dir=.")
    assert key("paths.output_dir=/elsewhere", "trainer.num_threads=2", "cv.jobs=4", "export.name=other") == stands
    assert key("paths.output_dir=.", "trainer.max_epochs=30") == stands  # the config's own value, spelled out
    assert key("paths.output_dir=.", "trainer.max_epochs=31") != stands
    assert key("paths.output_dir=.", "export.tta=none") != stands
    assert "/elsewhere" not in key("paths.output_dir=/elsewhere")
    # a setting added later leaves the key of a recipe that does not use it as it was, and changes one that does
    assert '"refit"' not in stands and key("paths.output_dir=.", "data.refit=true") != stands
