"""model.json's `output.calibrated` says whether served probabilities are calibrated: read as a truth value, the text
"false" would count as calibrated, so the schema takes a JSON boolean only."""

import pytest

from medtriage.format.schema import MODEL_SCHEMA, schema_errors

OUTPUT = {"name": "probabilities", "classes": 2}


def output_errors(**fields) -> list[str]:
    return schema_errors({**OUTPUT, **fields}, MODEL_SCHEMA["properties"]["output"], "$.output")


@pytest.mark.parametrize("flag", [True, False])
def test_a_boolean_calibrated_flag_is_accepted(flag):
    assert output_errors(calibrated=flag) == []


def test_a_package_without_the_flag_is_accepted():
    """Packages exported before the flag existed say nothing; the calibration method decides for them."""
    assert output_errors() == []


@pytest.mark.parametrize("flag, got", [("false", "str"), ("true", "str"), (0, "int"), (None, "NoneType")])
def test_a_calibrated_flag_that_is_no_boolean_is_refused_naming_it(flag, got):
    assert output_errors(calibrated=flag) == [f"$.output.calibrated: expected boolean, got {got}"]
