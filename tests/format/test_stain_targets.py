"""model.json's `pathology.target_stains`: serving restains every tile with it, so a matrix of another shape, or a
stain with no concentration, is refused when the package loads rather than failing (or blanking) every slide."""

import pytest

from medtriage.errors import PackageError
from medtriage.format.schema import MODEL_SCHEMA, schema_errors, validate_model_json
from medtriage.io.stain import REFERENCE_STAINS, StainNormalizer, Stains

PATHOLOGY = {
    "tile_size": 48,
    "tile_mpp": 0.5,
    "stain_normalization": "macenko",
    "min_tissue": 0.5,
    "aggregation": "top_k",
    "top_k": 3,
}
STAINS = REFERENCE_STAINS.to_dict()
TRANSPOSED = [list(column) for column in zip(*STAINS["matrix"], strict=True)]


def pathology_errors(target_stains) -> list[str]:
    return schema_errors({**PATHOLOGY, "target_stains": target_stains}, MODEL_SCHEMA["properties"]["pathology"])


@pytest.mark.parametrize("target_stains", [STAINS, None], ids=["fitted", "reference"])
def test_fitted_or_reference_stains_are_accepted_and_serve(target_stains):
    assert pathology_errors(target_stains) == []
    StainNormalizer(REFERENCE_STAINS, Stains.from_dict(target_stains or STAINS))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"matrix": TRANSPOSED}, "matrix"),
        ({"matrix": STAINS["matrix"][:2]}, "matrix"),
        ({"matrix": [*STAINS["matrix"][:2], STAINS["matrix"][2][:1]]}, "matrix[2]"),
        ({"matrix": [["0.5", "0.2"], *STAINS["matrix"][1:]]}, "matrix[0][0]"),
        ({"max_concentrations": [*STAINS["max_concentrations"], 1.0]}, "max_concentrations"),
        ({"max_concentrations": [0.0, 1.0]}, "max_concentrations[0]"),
    ],
    ids=["transposed", "two rows", "ragged", "text", "three stains", "no concentration"],
)
def test_stains_serving_cannot_use_are_refused_naming_the_field(change, field):
    errors = pathology_errors({**STAINS, **change})
    assert errors and errors[0].startswith(f"$.target_stains.{field}:")


def test_a_package_with_a_transposed_stain_matrix_is_refused_naming_it():
    with pytest.raises(PackageError, match=r"pathology\.target_stains\.matrix: needs at least 3 items"):
        validate_model_json({"pathology": {**PATHOLOGY, "target_stains": {**STAINS, "matrix": TRANSPOSED}}})
