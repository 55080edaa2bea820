"""The model's declared scope (`model.json` → `scope`): what it may be shown, checked on header facts before inference.

A chest X-ray model must not put a score on a CT slice just because the slice decodes. Export writes
the scope from the training pool's headers; serving compares each decoded image's header facts
with it and names the first field that does not fit. Facts an image does not record (no body part,
no pixel spacing) are not held against it: many real modalities leave them empty. Code strings (modality, body part...)
match whatever their case and padding: the standard writes them upper case, but headers in the wild say 'chest'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medtriage.errors import InputError
from medtriage.io.dicom import DecodedImage

log = logging.getLogger(__name__)
OUT_OF_SCOPE, UNUSUAL_INPUT = "out_of_scope", "unusual_input"
# Bounds that hold whatever a scope lists, because the graph squeezes every image into its square input: a strip
# (a stitched spine, a sliver cut from a film) arrives distorted beyond reading, and a few pixels carry no picture.
MIN_SIDE, MAX_ASPECT_RATIO = 16, 3.0


class OutOfScopeError(InputError):
    """An image the model was not made for (another modality, SOP class, size...): refused before inference."""

    code = OUT_OF_SCOPE

    def __init__(self, field: str, value, allowed, *, where: str | None = None):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(
            f"out of scope: {field} {value!r} is not {describe_allowed(allowed)}",
            where=where,
            hint="the model was trained on other images; send it only what its scope (model.json) lists, "
            "or score anyway with --allow-out-of-scope (results are marked)",
        )


class UnusualInputError(InputError):
    """Pixels unlike anything the model was trained on (its OOD score is above the package's threshold):
    the header may lie (a CT saved as CR). Not scored: a score on such an image would mean nothing."""

    code = UNUSUAL_INPUT
    field = None

    def __init__(self, score: float, threshold: float, *, where: str | None = None, withheld: list | None = None):
        self.score, self.threshold, self.withheld = score, threshold, withheld
        super().__init__(
            f"unusual input: OOD score {score:.1f} is above the threshold {threshold:.1f} "
            "(the image does not look like the model's training images)",
            where=where,
            hint="have it read without triage; score anyway with --allow-out-of-scope (results are marked)",
        )


def describe_allowed(allowed) -> str:
    if isinstance(allowed, dict):  # a range
        low, high = allowed.get("min"), allowed.get("max")
        if low is None:
            return f"at most {high}"
        if high is None:
            return f"at least {low}"
        return f"within [{low}, {high}]"
    return "one of " + ", ".join(map(str, allowed))


@dataclass(frozen=True)
class ScopeFailure:
    field: str
    value: object
    allowed: object

    def error(self, where: str | None = None) -> OutOfScopeError:
        return OutOfScopeError(self.field, self.value, self.allowed, where=where)


def header_facts(image: DecodedImage) -> dict:
    """The facts of a decoded image that a scope speaks about."""
    return {
        "modality": code(image.modality),
        "sop_class": image.sop_class_uid.strip(),
        "photometric": code(image.photometric),
        "channels": int(image.pixels.shape[1]),
        "bits_stored": image.bits_stored or None,
        "body_part": code(image.body_part) or None,
        "view_position": code(image.view_position) or None,
        "rows": image.rows,
        "columns": image.columns,
        "aspect_ratio": round(max(image.rows, image.columns) / max(min(image.rows, image.columns), 1), 2),
        "pixel_spacing": tuple(image.pixel_spacing) if image.pixel_spacing else None,
    }


# (fact, scope key, kind) in the order they are checked: the coarsest mismatch is the one reported.
CHECKS = (
    ("modality", "modalities", "one_of"),
    ("sop_class", "sop_classes", "one_of"),
    ("photometric", "photometric", "one_of"),
    ("channels", "channels", "one_of"),
    ("body_part", "body_parts", "one_of"),
    ("view_position", "view_positions", "one_of"),
    ("bits_stored", "bits_stored", "range"),
    ("rows", "min_rows", "minimum"),
    ("columns", "min_columns", "minimum"),
    ("aspect_ratio", "max_aspect_ratio", "maximum"),
    ("pixel_spacing", "pixel_spacing_mm", "range"),
)


def first_failure(scope: dict, facts: dict) -> ScopeFailure | None:
    """The first fact outside `scope`, or None when the image fits. Absent facts and unset scope keys pass."""
    scope = with_structural_bounds(scope)
    for fact, key, kind in CHECKS:
        allowed, value = scope.get(key), facts.get(fact)
        if allowed is None or value is None:
            continue
        if kind == "one_of" and code(value) not in {code(v) for v in allowed}:
            return ScopeFailure(fact, value, list(allowed))
        if kind == "minimum" and value < allowed:
            return ScopeFailure(fact, value, {"min": allowed})
        if kind == "maximum" and value > allowed:
            return ScopeFailure(fact, value, {"max": allowed})
        if kind == "range" and not all(allowed[0] <= v <= allowed[1] for v in _values(value)):
            return ScopeFailure(fact, value, {"min": allowed[0], "max": allowed[1]})
    return None


def with_structural_bounds(scope: dict) -> dict:
    """`scope` with the size and shape bounds every image must meet; a scope's own stricter bound still holds
    (a larger minimum side, a smaller maximum aspect ratio)."""
    return {
        **scope,
        "min_rows": max(scope.get("min_rows") or 0, MIN_SIDE),
        "min_columns": max(scope.get("min_columns") or 0, MIN_SIDE),
        "max_aspect_ratio": min(scope.get("max_aspect_ratio") or MAX_ASPECT_RATIO, MAX_ASPECT_RATIO),
    }


def code(value):
    """A code string as a scope compares it: DICOM pads CS values with spaces and spells them upper case, but headers
    in the wild (and scopes written from them) carry 'chest' or 'Chest '. Numbers pass unchanged."""
    return value.strip().upper() if isinstance(value, str) else value


def _values(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def check_scope(scope: dict | None, image: DecodedImage, where: str | None = None) -> None:
    """Raise OutOfScopeError naming the first failing field; a package without a scope checks nothing."""
    if scope is None:
        return
    failure = first_failure(scope, header_facts(image))
    if failure is not None:
        raise failure.error(where)


def warn_if_unguarded(meta: dict, where: str) -> None:
    """Say at load what a package cannot refuse: without a scope any header passes, without an OOD score any pixels."""
    if meta.get("scope") is None:
        log.warning("%s declares no scope: every decodable image will be scored (re-export it to add one)", where)
    if meta.get("ood") is None:
        log.warning("%s carries no OOD score: images unlike its training images will not be flagged as unusual", where)
