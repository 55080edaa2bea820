"""The benchmark's report plumbing (the timed run itself is scripts/benchmark_inference.py, not a test)."""

from medtriage.benchmarking import write_section
from medtriage.export.benchmark import SECTION, Timing, markdown, time_calls


def fake_result() -> dict:
    row = {"file": "CT_small.dcm", "shape": "128x128", "serve": Timing(11.0, 13.0), "ort": Timing(10.0, 12.0), "torch": Timing(30.0, 40.0),
           "decode": Timing(0.9, 1.2)}
    return {"network": "resnet18", "size": 224, "repeats": 5, "threads": 2, "provider": "CPUExecutionProvider", "machine": "test cpu",
            "rows": [row], "batches": [{"batch": 16, "ort_images_s": 100.0, "torch_images_s": 40.0}]}


def test_inference_section_is_replaced_and_other_sections_kept(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Pathology\nslides: 5/s\n\n## Inference\nold figures\n\n## Training\nepoch: 3 s\n")
    section = markdown(fake_result(), "python scripts/benchmark_inference.py")
    write_section(section, doc)
    text = doc.read_text()
    assert "old figures" not in text and text.count(SECTION) == 1
    assert "## Pathology\nslides: 5/s" in text and "## Training\nepoch: 3 s" in text
    assert "| CT_small.dcm | 128x128 | 11.0 / 13.0 | 10.0 / 12.0 | 30.0 / 40.0 | 1.10 | 3.00 | 0.9 |" in text
    write_section(section, doc)  # idempotent
    assert doc.read_text() == text


def test_section_is_appended_to_a_new_document(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    write_section(markdown(fake_result(), "cmd"), doc)
    assert doc.read_text().startswith("# Benchmarks") and SECTION in doc.read_text()


def test_time_calls_times_every_call():
    counts = {"a": 0, "b": 0}

    def bump(name):
        counts[name] += 1

    timings = time_calls({"a": lambda: bump("a"), "b": lambda: bump("b")}, repeats=4, warmup=1)
    assert counts == {"a": 5, "b": 5} and set(timings) == {"a", "b"}
    assert all(t.p95_ms >= t.median_ms >= 0 for t in timings.values())
