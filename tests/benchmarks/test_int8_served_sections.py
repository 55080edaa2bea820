"""INT8 and served-path sections: verdicts follow the figures (the timed runs are the benchmarks, not tests)."""

import argparse

from benchmarks import int8, served_path
from benchmarks.common import Timing


def timing(ms: float) -> Timing:
    return Timing(seconds=[ms / 1000] * 3)


def int8_result(prepared_batch16_ms: float) -> dict:
    figures = {"batch 1": (1.0, 0.9, 0.4), "batch 16": (4.0, prepared_batch16_ms, 2.0), "CT_small.dcm (decode + score)": (3.0, 3.0, 2.0)}
    timings = {}
    for what, (fp32, prepared, quantised) in figures.items():
        timings.update({(what, "fp32"): timing(fp32), (what, int8.PREPARED): timing(prepared), (what, "int8"): timing(quantised)})
    float_scores = {"auc": 0.9600, "ece": 0.040}
    return {
        "package": "tiny v1",
        "test_images": 10,
        "scores": {"fp32": float_scores, int8.PREPARED: float_scores, "int8": {"auc": 0.9590, "ece": 0.045}},
        "timings": timings,
        "parity": {"max_abs_diff": 0.03, "mean_abs_diff": 0.001, "priority_changes": 1, "images": 256},
        "calibration": "val, 256 images",
        "nodes": 13,
        "trimmed": ["conv_a"],
        "method": "QDQ",
        "threads": None,
        "repeats": 5,
    }


def test_int8_speed_counts_against_the_fp32_package_and_its_prepared_graph():
    met = int8.markdown(int8_result(prepared_batch16_ms=3.8), "python -m benchmarks.int8", "cpu")
    assert (
        "| latency, batch 16 (median / p95 ms) | 4.00 / 4.00 | 3.80 / 3.80 | 2.00 / 2.00 | 2.00x | 1.90x | ≥ 1.8x (both) | **met** |" in met
    )
    assert "Both targets are met" in met and "from conv_a" in met
    # 2x faster than the package, but only 1.5x faster than the same graph prepared and left in fp32: not met
    missed = int8.markdown(int8_result(prepared_batch16_ms=3.0), "python -m benchmarks.int8", "cpu")
    assert "| 2.00x | 1.50x | ≥ 1.8x (both) | **not met** |" in missed and "**fp32 stays the default**" in missed


def served_row(file: str, settings: dict[str, dict[str, float]]) -> dict:
    timings = {(setting, call): timing(ms) for setting, calls in settings.items() for call, ms in calls.items()}
    return {"file": file, "shape": "128x128", "settings": list(settings), "rounds": 40, "timings": timings}


def test_served_path_verdict_uses_the_served_setting_only():
    calls = {"header": 1.0, "decode": 2.0, "ort": 1.0, "bare": 3.1, "serve": 3.0}
    slow = {**calls, "serve": 3.2}
    rows = [
        served_row("CT_small.dcm", {"served": calls, "spinning": slow}),
        served_row("RG1_J2KR.dcm", {"served": slow, "reduced j2k": {**calls, "serve": 0.5}}),
    ]
    args = argparse.Namespace(threads=None, repeats=40, budget=12.0)
    text = served_path.markdown(rows, "tiny v1", args, "cpu")
    assert "| CT_small.dcm | 128x128 | served | 40 | 1.00 | 2.00 | 1.00 | 3.10 | 3.00 (3.00) | 0.97 | +0.00 |" in text
    assert "| RG1_J2KR.dcm | 128x128 | reduced j2k | 40 |" in text and "| 0.16 |" in text
    assert "**not met** (1 of 2 files)" in text  # the J2K file's served row is 3.2 / 3.1; its opt-in row does not count
