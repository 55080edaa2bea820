"""A scope's own bounds as a hand-edited model.json may hold them: a stricter maximum aspect ratio than the structural
one still refuses, a looser one does not widen it, and values no check could use are refused when the package loads."""

from __future__ import annotations

import pytest
from pydicom.data import get_testdata_file

from medtriage.format.schema import MODEL_SCHEMA, schema_errors
from medtriage.io.dicom import read_dicom
from medtriage.serve.scope import MAX_ASPECT_RATIO, first_failure, header_facts

SCOPE_SCHEMA = MODEL_SCHEMA["properties"]["scope"]


@pytest.fixture(scope="module")
def film() -> dict:
    """The header facts of a real 1955 x 1841 chest CR (aspect ratio 1.06)."""
    return header_facts(read_dicom(get_testdata_file("RG1_UNCR.dcm")))


def test_a_scopes_own_smaller_maximum_aspect_ratio_still_holds(film):
    """A site may tighten the shape a model accepts: that bound must refuse, not be replaced by the structural one."""
    elongated = {**film, "aspect_ratio": 2.0}
    failure = first_failure({"max_aspect_ratio": 1.5}, elongated)
    assert failure is not None and (failure.field, failure.allowed) == ("aspect_ratio", {"max": 1.5})
    assert first_failure({"max_aspect_ratio": 1.5}, film) is None


def test_a_looser_maximum_aspect_ratio_keeps_the_structural_one(film):
    strip = {**film, "aspect_ratio": MAX_ASPECT_RATIO + 0.5}
    assert first_failure({"max_aspect_ratio": 10.0}, strip).allowed == {"max": MAX_ASPECT_RATIO}


@pytest.mark.parametrize(
    ("scope", "problem"),
    [
        ({"max_aspect_ratio": 0.5}, "< minimum 1"),  # no image could pass
        ({"max_aspect_ratio": "1.5"}, "expected number"),  # would fail the comparison on every image
        ({"max_aspect_ratio": True}, "expected number"),
        ({"max_aspect_ratio": float("nan")}, "expected number"),
        ({"body_parts": []}, "at least 1"),  # would refuse every image recording one, naming no allowed value
        ({"view_positions": []}, "at least 1"),
        ({"bits_stored": [8, 12, 16]}, "at most 2"),  # read as [8, 12] without a word
        ({"pixel_spacing_mm": [0.1, 0.2, 0.3]}, "at most 2"),
    ],
)
def test_scope_values_no_check_could_use_are_refused_by_the_schema(scope, problem):
    errors = schema_errors({"modalities": ["CR"], **scope}, SCOPE_SCHEMA, "$.scope")
    assert any(problem in error for error in errors), errors


def test_a_null_list_still_means_not_checked(film):
    assert schema_errors({"modalities": ["CR"], "body_parts": None, "view_positions": None}, SCOPE_SCHEMA) == []
