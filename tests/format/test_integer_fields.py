"""Whole-number floats where model.json's schema says integer: JSON Schema counts 48.0 an integer, the schema check
accepts it, and the package is read with an int there."""

from __future__ import annotations

import pytest

from medtriage.format.schema import MODEL_SCHEMA, integers_as_int, schema_errors

PATHOLOGY = {"tile_size": 48.0, "tile_mpp": 1.0, "stain_normalization": None, "min_tissue": 0.5, "aggregation": "top_k", "top_k": 5.0}


def test_integer_fields_become_ints_and_number_fields_stay_as_written():
    block = integers_as_int(PATHOLOGY, MODEL_SCHEMA["properties"]["pathology"])
    assert block == PATHOLOGY and schema_errors(PATHOLOGY, MODEL_SCHEMA["properties"]["pathology"]) == []
    assert [type(block[k]) for k in ("tile_size", "top_k", "tile_mpp", "min_tissue")] == [int, int, float, float]
    assert type(PATHOLOGY["tile_size"]) is float  # a copy: the caller's dict is left alone


def test_integers_in_arrays_nested_objects_and_free_keys():
    meta = {
        "scope": {"modalities": ["SM"], "channels": [3.0], "bits_stored": [8.0, 8.0], "pixel_spacing_mm": [0.5, 1.0]},
        "drift": {"window": 200.0, "min_images": 100.0, "site_psi_thresholds": {"a": 1.0}},
        "quantization": {"parity": {"images": 64.0, "priority_changes": 0.0, "max_abs_diff": 0.0}},
        "unknown": 3.0,
    }
    read = integers_as_int(meta)
    assert read == meta
    scope = read["scope"]
    assert [type(v) for v in scope["channels"] + scope["bits_stored"] + scope["pixel_spacing_mm"]] == [int, int, int, float, float]
    assert type(read["drift"]["window"]) is int and type(read["drift"]["site_psi_thresholds"]["a"]) is float
    assert type(read["quantization"]["parity"]["images"]) is int and type(read["quantization"]["parity"]["max_abs_diff"]) is float
    assert type(read["unknown"]) is float  # no schema says what it is


@pytest.mark.parametrize("value", [48.5, float("nan"), float("inf"), True, "48", None])
def test_what_is_no_whole_number_float_is_left_for_the_schema_check(value):
    block = integers_as_int({**PATHOLOGY, "tile_size": value}, MODEL_SCHEMA["properties"]["pathology"])
    assert block["tile_size"] is value


def test_values_of_the_wrong_shape_pass_through_for_the_schema_check_to_name():
    for odd in ([], "x", 3.0, {"input": [1.0]}, {"scope": "all"}, {"label_names": {"a": 1.0}}):
        assert integers_as_int(odd) == odd
