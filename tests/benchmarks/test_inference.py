"""The inference section: figures, ratios and verdicts follow what was measured (the timed run itself is
`python -m benchmarks.inference`, not a test)."""

from benchmarks.common import write_section
from benchmarks.inference import SECTION, markdown, network_words


def fake_result(serve_ms: float = 11.0, torch_ms: float = 30.0, network: str = "resnet18") -> dict:
    row = {
        "file": "CT_small.dcm",
        "shape": "128x128",
        "serve": (serve_ms, 13.0),
        "ort": (10.0, 12.0),
        "torch": (torch_ms, 40.0),
        "decode": (0.9, 1.2),
    }
    return {
        "network": network,
        "stem_stride": 2,
        "size": 224,
        "repeats": 5,
        "threads": 2,
        "provider": "CPUExecutionProvider",
        "versions": "onnxruntime x, torch y",
        "rows": [row],
        "batches": [{"batch": 16, "ort_images_s": 100.0, "torch_images_s": 40.0}],
    }


def test_inference_section_is_replaced_and_other_sections_kept(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Pathology\nslides: 5/s\n\n## Inference\nold figures\n\n## Training\nepoch: 3 s\n")
    section = markdown(fake_result(), "python -m benchmarks.inference", "test cpu")
    write_section(section, doc)
    text = doc.read_text()
    assert "old figures" not in text and text.count(SECTION) == 1
    assert "## Pathology\nslides: 5/s" in text and "## Training\nepoch: 3 s" in text
    assert "| CT_small.dcm | 128x128 | 11.0 / 13.0 | 10.0 / 12.0 | 30.0 / 40.0 | 1.10 | 3.00 | 0.9 |" in text
    assert "- command: `python -m benchmarks.inference`" in text and "- machine: test cpu" in text and "- date: " in text
    write_section(section, doc)  # idempotent
    assert doc.read_text() == text


def test_verdicts_are_computed_against_each_target():
    met = markdown(fake_result(serve_ms=11.0, torch_ms=30.0), "cmd", "cpu")
    assert "a/b 1.10 **met**; c/b 3.00 **met**" in met
    missed = markdown(fake_result(serve_ms=15.0, torch_ms=15.0), "cmd", "cpu")
    assert "a/b 1.50 **not met**; c/b 1.50 **not met**" in missed


def test_the_model_is_described_as_built():
    assert network_words("resnet18", 2) == "resnet18 (stride-2 7x7 stem)"
    assert network_words("resnet18", 1) == "resnet18 (stride-1 3x3 stem, no max-pool)"
    assert network_words("densenet121", 2) == "densenet121"  # no stem claim for a network that takes no stem stride
    assert "stem" not in markdown(fake_result(network="densenet121"), "cmd", "cpu")
