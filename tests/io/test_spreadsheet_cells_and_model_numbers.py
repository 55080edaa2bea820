"""Edges of spreadsheet cells and model.json numbers: a cell that a spreadsheet would read as a formula stays text,
and a NaN or infinite number in model.json is refused like any other value out of its range."""

import json

import pytest

from medtriage.errors import PackageError
from medtriage.format.schema import MODEL_SCHEMA, schema_errors, validate_model_json
from medtriage.io.safe_output import spreadsheet_row, spreadsheet_text


@pytest.mark.parametrize("cell", [" =1+1", "  @SUM(A1)", "\n=HYPERLINK(x)", " \t+cmd", "\uff1d1+1", "\uff0bcmd", "\uff20x", "\uff0d2+3"])
def test_cells_that_start_like_a_formula_after_blanks_or_in_full_width_stay_text(cell):
    assert spreadsheet_text(cell) == "'" + cell
    assert spreadsheet_row({"detail": cell}) == {"detail": "'" + cell}


@pytest.mark.parametrize("number", ["-0.5", "-1", "+3", "-1e-3", "-.5", "2.5E+4"])
def test_plain_signed_numbers_stay_numbers(number):
    assert spreadsheet_text(number) == number


@pytest.mark.parametrize("formula", ["-2+3", "-1e-3+cmd|' /C calc'!A0", "-", "+ x", "=1"])
def test_a_signed_start_that_is_more_than_a_number_stays_text(formula):
    assert spreadsheet_text(formula) == "'" + formula


def _minimal_model_json() -> dict:
    point = {"rule": "youden", "threshold": 0.4, "sensitivity": 0.9, "specificity": 0.8}
    split = {"overall": {}, "per_site": {}}
    return {
        "schema_version": 1,
        "name": "cxr",
        "version": 1,
        "task": "binary",
        "label_names": ["normal", "abnormal"],
        "positive_label": "abnormal",
        "modality": "CR",
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW", "channels": 1, "value_range": [0, 1]},
        "output": {"name": "probabilities", "classes": 2},
        "preprocessing": {"decode": {}, "resize": {}, "normalize": {}},
        "calibration": {"method": "temperature", "temperature": 1.3, "ece_before": 0.1, "ece_after": 0.05},
        "thresholds": {"review": point, "urgent": {**point, "threshold": 0.8}},
        "metrics": {"val": split},
        "training_sites": ["a"],
        "provenance": {"mlflow_run_id": None, "git_commit": None, "data_fingerprint": None, "medtriage_version": "1"},
        "parity": {"max_abs_diff": 0.0, "tolerance": 1e-4, "images": 4},
        "sha256": "0" * 64,
    }


@pytest.mark.parametrize(
    ("section", "key", "literal"),
    [
        ("thresholds.urgent", "threshold", "NaN"),
        ("thresholds.review", "threshold", "NaN"),
        ("calibration", "temperature", "Infinity"),
        ("parity", "tolerance", "NaN"),
        ("parity", "max_abs_diff", "-Infinity"),
        ("input", "channels", "Infinity"),
    ],
)
def test_nan_and_infinite_numbers_in_model_json_are_refused(section, key, literal):
    meta = _minimal_model_json()
    validate_model_json(meta)  # valid as written
    text = json.dumps(meta)
    holder = meta
    for part in section.split("."):
        holder = holder[part]
    holder[key] = "__placeholder__"
    meta = json.loads(json.dumps(meta).replace('"__placeholder__"', literal))  # as Python's json reads a file
    assert text != json.dumps(meta)
    errors = schema_errors(meta, MODEL_SCHEMA)
    assert any(f"$.{section}.{key}: expected" in e for e in errors), errors
    with pytest.raises(PackageError, match=f"{key}"):
        validate_model_json(meta)


def test_a_path_or_other_text_like_value_is_checked_as_the_text_the_csv_gets():
    from pathlib import PurePosixPath

    class HeaderValue:  # like a DICOM person name: not a str, written as its text
        def __str__(self):
            return "=HYPERLINK(x)"

    assert spreadsheet_text(PurePosixPath("=1+1")) == "'=1+1"
    assert spreadsheet_text(HeaderValue()) == "'=HYPERLINK(x)"
    assert spreadsheet_text(PurePosixPath("scans/a.dcm")) == PurePosixPath("scans/a.dcm")
    assert [spreadsheet_text(v) for v in (0.5, -1, None, True)] == [0.5, -1, None, True]
