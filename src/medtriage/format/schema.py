"""JSON Schema of `model.json` and a small validator for the subset of JSON Schema it uses.

The schema is plain JSON Schema (draft 2020-12 keywords: type, required, properties, items,
enum, minimum, exclusiveMinimum, maximum, minItems, maxItems, minLength, pattern, additionalProperties), so other tools can validate packages too.
"""

from __future__ import annotations

import math
import re

from medtriage.errors import PackageError

SCHEMA_VERSION = 1
INPUT_AXES = ("batch", "channels", "height", "width")  # model.json's `input` keys, in the graph's NCHW order


def temperature_applied(calibration: dict) -> bool:
    """Whether a package's graph divides by its fitted temperature: model.json's `calibration.method` is not "none"."""
    return calibration.get("method") != "none"


_NUMBER = {"type": "number"}
_PROBABILITY = {"type": "number", "minimum": 0, "maximum": 1}
_OPERATING_POINT = {
    "type": "object",
    "required": ["rule", "threshold", "sensitivity", "specificity"],
    "properties": {
        "rule": {"type": "string", "enum": ["sensitivity", "specificity", "youden"]},
        "target": {"type": ["number", "null"]},
        "threshold": _PROBABILITY,
        "sensitivity": _PROBABILITY,
        "specificity": _PROBABILITY,
    },
}
_SPLIT_METRICS = {
    "type": "object",
    "required": ["overall", "per_site"],
    "properties": {"overall": {"type": "object"}, "per_site": {"type": "object"}},
}

_THRESHOLDS = {
    "type": "object",
    "required": ["review", "urgent"],
    "properties": {
        "review": _OPERATING_POINT,
        "urgent": {"type": ["object", "null"], **{k: v for k, v in _OPERATING_POINT.items() if k != "type"}},
    },
}
# io.stain.Stains: a haematoxylin and an eosin column of OD per RGB channel, and each stain's max concentration.
_STAINS = {
    "type": ["object", "null"],
    "required": ["matrix", "max_concentrations"],
    "properties": {
        "matrix": {
            "type": "array",
            "items": {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2},
            "minItems": 3,
            "maxItems": 3,
        },
        "max_concentrations": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 2, "maxItems": 2},
    },
}
# Optional: present when the model scores slide tiles (how to cut, stain and combine them; serve/slides.py).
_PATHOLOGY = {
    "type": "object",
    "required": ["tile_size", "tile_mpp", "stain_normalization", "min_tissue", "aggregation", "top_k"],
    "properties": {
        "tile_size": {"type": "integer", "minimum": 1},
        "tile_mpp": {"type": "number", "exclusiveMinimum": 0},
        "stain_normalization": {"type": ["string", "null"], "enum": ["macenko", None]},
        "target_stains": _STAINS,
        "min_tissue": _PROBABILITY,
        "aggregation": {"type": "string", "enum": ["mean", "top_k"]},
        "top_k": {"type": "integer", "minimum": 1},
        "threshold_level": {"type": "string", "enum": ["slide", "tile"]},
        "slide_thresholds": {"type": ["object", "null"], **{k: v for k, v in _THRESHOLDS.items() if k != "type"}},
        "slide_metrics": {"type": "object", "properties": {"val": _SPLIT_METRICS, "test": _SPLIT_METRICS}},
    },
}

# Optional (packages exported before they existed still load): what the model may be shown
# (serve/scope.py), its in-graph out-of-distribution score, and the reference distributions
# the drift monitor compares live inputs with (serve/drift.py).
_NAMES = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_RATIO = {"type": "number", "minimum": 1}
_SCOPE = {
    "type": "object",
    "required": ["modalities"],  # a pool without DICOM headers declares its modality alone (export/safety.py)
    "properties": {
        "modalities": _NAMES,
        "sop_classes": _NAMES,
        "photometric": _NAMES,
        "channels": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
        # null: not checked; an empty list would refuse every image that records one, with nothing to say why
        "body_parts": {"type": ["array", "null"], "items": {"type": "string"}, "minItems": 1},
        "view_positions": {"type": ["array", "null"], "items": {"type": "string"}, "minItems": 1},
        # [low, high]: a third value would be ignored without a word
        "bits_stored": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "min_rows": {"type": "integer", "minimum": 1},
        "min_columns": {"type": "integer", "minimum": 1},
        "pixel_spacing_mm": {"type": ["array", "null"], "items": {"type": "number", "minimum": 0}, "minItems": 2, "maxItems": 2},
        # not written by export: a site may narrow the structural bound (serve/scope.py MAX_ASPECT_RATIO) by hand
        "max_aspect_ratio": _RATIO,
    },
}
_OOD = {
    "type": "object",
    "required": ["output", "method", "threshold", "false_alarm_rate"],
    "properties": {
        "output": {"type": "string", "minLength": 1},  # blank, serving would skip the check without a word
        "method": {"type": "string"},
        "threshold": _NUMBER,
        "false_alarm_rate": _PROBABILITY,
    },
}
_HISTOGRAM = {
    "type": "object",
    "required": ["edges", "proportions"],
    "properties": {"edges": {"type": "array", "items": _NUMBER}, "proportions": {"type": "array", "items": _PROBABILITY, "minItems": 2}},
}
_DRIFT = {
    "type": "object",
    "required": ["features", "window", "min_images", "psi_threshold", "reference"],
    "properties": {
        "features": _NAMES,
        "window": {"type": "integer", "minimum": 1},
        "min_images": {"type": "integer", "minimum": 1},
        "psi_threshold": {"type": "number", "minimum": 0},
        "site_psi_thresholds": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},  # per_site's own
        "reference": {
            "type": "object",
            "required": ["all", "per_site"],
            "properties": {"all": {"type": "object", "additionalProperties": _HISTOGRAM}, "per_site": {"type": "object"}},
        },
    },
}

_QUANTIZATION = {
    "type": "object",
    "required": ["method", "source", "calibration", "parity"],
    "properties": {
        "method": {"type": "string"},
        "source": {"type": "object", "required": ["name", "version", "sha256"]},
        "calibration": {"type": "string"},
        "parity": {
            "type": "object",
            "required": ["images", "max_abs_diff", "priority_changes"],
            "properties": {
                "images": {"type": "integer", "minimum": 1},
                "max_abs_diff": _PROBABILITY,
                "priority_changes": {"type": "integer", "minimum": 0},
            },
        },
    },
}

MODEL_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "MedTriage model package (model.json)",
    "type": "object",
    "required": [
        "schema_version",
        "name",
        "version",
        "task",
        "label_names",
        "positive_label",
        "modality",
        "input",
        "output",
        "preprocessing",
        "calibration",
        "thresholds",
        "metrics",
        "training_sites",
        "provenance",
        "parity",
        "sha256",
    ],
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "version": {"type": "integer", "minimum": 1},
        "task": {"type": "string"},
        "label_names": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "positive_label": {"type": "string"},
        "modality": {"type": "string"},
        "input": {
            "type": "object",
            "required": ["name", "dtype", "layout", "channels", "value_range"],
            "properties": {
                "name": {"type": "string"},
                "dtype": {"type": "string", "enum": ["float32"]},
                "layout": {"type": "string", "enum": ["NCHW"]},
                "channels": {"type": "integer", "minimum": 1},
                "value_range": {"type": "array", "items": _NUMBER, "minItems": 2},
            },
        },
        "output": {
            "type": "object",
            "required": ["name", "classes"],
            "properties": {
                "name": {"type": "string"},
                "classes": {"type": "integer", "minimum": 2},
                # absent in packages exported before it; a boolean where present ("false" would read as true)
                "calibrated": {"type": "boolean"},
            },
        },
        "preprocessing": {"type": "object", "required": ["decode", "resize", "normalize"]},
        "network": {"type": "object"},
        "calibration": {
            "type": "object",
            "required": ["method", "temperature", "ece_before", "ece_after"],
            "properties": {
                "method": {"type": "string"},
                "temperature": {"type": "number", "minimum": 0},
                "ece_before": _PROBABILITY,
                "ece_after": _PROBABILITY,
            },
        },
        "thresholds": _THRESHOLDS,
        "pathology": _PATHOLOGY,
        "scope": _SCOPE,
        "ood": _OOD,
        "drift": _DRIFT,
        "metrics": {"type": "object", "required": ["val"], "properties": {"val": _SPLIT_METRICS, "test": _SPLIT_METRICS}},
        "training_sites": {"type": "array", "items": {"type": "string"}},
        "provenance": {
            "type": "object",
            "required": ["mlflow_run_id", "git_commit", "data_fingerprint", "medtriage_version"],
            "properties": {
                "mlflow_run_id": {"type": ["string", "null"]},
                "git_commit": {"type": ["string", "null"]},
                "data_fingerprint": {"type": ["string", "null"]},
                "medtriage_version": {"type": "string"},
            },
        },
        "parity": {
            "type": "object",
            "required": ["max_abs_diff", "tolerance", "images"],
            "properties": {
                "max_abs_diff": {"type": "number", "minimum": 0},
                "tolerance": _NUMBER,
                "images": {"type": "integer", "minimum": 1},
            },
        },
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        # Numeric precision of model.onnx (absent: fp32); an int8 package names its fp32 source and parity.
        "precision": {"type": "string", "enum": ["fp32", "int8"]},
        "quantization": _QUANTIZATION,
    },
}

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "integer": int,
    "number": (int, float),
}


def schema_errors(value, schema: dict = MODEL_SCHEMA, where: str = "$") -> list[str]:
    """Every way `value` breaks `schema`, as 'path: problem' lines (empty when valid)."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in types):
            got = value if isinstance(value, float) else type(value).__name__  # nan / inf say what is wrong
            return [f"{where}: expected {' or '.join(types)}, got {got}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{where}: {value} <= exclusive minimum {schema['exclusiveMinimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        errors.append(f"{where}: {value!r} is shorter than {schema['minLength']} character(s)")
    if isinstance(value, str) and "pattern" in schema and not re.search(_ecma(schema["pattern"]), value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: needs at least {schema['minItems']} items")
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where}: holds {len(value)} items, at most {schema['maxItems']} allowed")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict):
        missing = [f"'{key}'" for key in schema.get("required", []) if key not in value]
        if missing:
            errors.append(f"{where}: missing {', '.join(missing)}")
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{where}.{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            for key in value.keys() - properties.keys():
                errors += schema_errors(value[key], schema["additionalProperties"], f"{where}.{key}")
    return errors


def consistency_errors(meta: dict) -> list[str]:
    """Ways the fields of a schema-valid `model.json` disagree with each other (serving would fail on them later,
    with a traceback, or quietly mislabel results)."""
    labels = meta["label_names"]
    errors = (
        [] if meta["positive_label"] in labels else [f"$.positive_label: {meta['positive_label']!r} is not one of label_names {labels}"]
    )
    if len(set(labels)) != len(labels):
        errors.append(f"$.label_names: {labels} repeats a name")
    if meta["output"]["classes"] != len(labels):
        errors.append(f"$.output.classes: {meta['output']['classes']} classes, but label_names has {len(labels)}")
    reference = (meta.get("drift") or {}).get("reference", {})
    for site, histograms in reference.get("per_site", {}).items():
        if not isinstance(histograms, dict):  # the schema leaves a site's entry free; the monitor would skip the site
            errors.append(f"$.drift.reference.per_site.{site} is a {type(histograms).__name__}, not an object of histograms")
    for site, histograms in [("all", reference.get("all", {})), *reference.get("per_site", {}).items()]:
        for feature, histogram in histograms.items() if isinstance(histograms, dict) else ():
            errors += _histogram_errors(histogram, f"$.drift.reference.{site}.{feature}")
    errors += _operating_point_errors(meta.get("thresholds"), "thresholds") + _ood_output_errors(meta)
    pathology = meta.get("pathology")
    if isinstance(pathology, dict):
        errors += _operating_point_errors(pathology.get("slide_thresholds"), "pathology.slide_thresholds")
    return errors + _drift_window_errors(meta.get("drift")) + _scope_range_errors(meta.get("scope"))


def _operating_point_errors(block, where: str) -> list[str]:
    """An urgent threshold below the review one would mark URGENT an image whose finding is the negative label."""
    if not isinstance(block, dict) or not isinstance(block.get("urgent"), dict) or not isinstance(block.get("review"), dict):
        return []
    review, urgent = block["review"].get("threshold"), block["urgent"].get("threshold")
    if isinstance(review, (int, float)) and isinstance(urgent, (int, float)) and urgent < review:
        return [f"$.{where}.urgent.threshold {urgent} is below {where}.review.threshold {review} (urgent must be at or above review)"]
    return []


def _ood_output_errors(meta: dict) -> list[str]:
    """The OOD score read from the probabilities' own output would be a row of class probabilities per image."""
    output = (meta.get("ood") or {}).get("output")
    if output is not None and output == meta["output"]["name"]:
        return [f"$.ood.output {output!r} is output.name too: the OOD score needs an output of its own"]
    return []


def _drift_window_errors(drift) -> list[str]:
    """A window shorter than min_images never holds enough images to alert: the drift watch would be off, unsaid."""
    window, min_images = (drift.get("window"), drift.get("min_images")) if isinstance(drift, dict) else (None, None)
    if isinstance(window, int) and isinstance(min_images, int) and min_images > window:
        return [f"$.drift.min_images {min_images} is more than drift.window {window}: no source could ever raise a drift alert"]
    return []


def _scope_range_errors(scope) -> list[str]:
    """A range listed high end first holds no value: every image would be refused as out of scope."""
    errors = []
    for key in ("bits_stored", "pixel_spacing_mm") if isinstance(scope, dict) else ():
        low_high = scope.get(key)
        if isinstance(low_high, list) and len(low_high) >= 2 and low_high[0] > low_high[1]:
            errors.append(f"$.scope.{key} {low_high} is no range: its first value (the lowest allowed) is above its second")
    return errors


def _histogram_errors(histogram, where: str) -> list[str]:
    errors = schema_errors(histogram, _HISTOGRAM, where)  # per-site histograms have no schema of their own
    if errors:
        return errors
    edges, proportions = histogram["edges"], histogram["proportions"]
    if len(proportions) != len(edges) + 1:
        return [f"{where}: {len(proportions)} proportions for {len(edges)} edges (needs one more proportion than edges)"]
    if edges != sorted(edges):
        return [f"{where}: edges must be increasing"]
    return []


def _ecma(pattern: str) -> str:
    """JSON Schema patterns are ECMA-262, where a final `$` is the end of the text; in Python it also matches before
    a final newline, which would let 'name\\n' through."""
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern


def _is_type(value, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name in ("integer", "number") and isinstance(value, float) and not math.isfinite(value):
        return False  # JSON has no NaN or Infinity (Python's json reads them); NaN passes every bound unnoticed
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[name])


def integers_as_int(value, schema: dict = MODEL_SCHEMA):
    """A copy of `value` with each whole-number float where `schema` wants an integer (48.0) made an int (48).

    JSON Schema counts 48.0 an integer, so other tools write and accept it, and packages holding one have always
    loaded; Python given 48.0 where it counts or sizes (range, numpy shapes, PIL) fails far from model.json. The walk
    follows the schema only, never deeper than it."""
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types or []
    if isinstance(value, float) and "integer" in types and "number" not in types and _is_type(value, "integer"):
        return int(value)
    if isinstance(value, list) and schema.get("items"):
        return [integers_as_int(item, schema["items"]) for item in value]
    if isinstance(value, dict) and (schema.get("properties") or isinstance(schema.get("additionalProperties"), dict)):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {}
        return {key: integers_as_int(item, properties.get(key, extra)) for key, item in value.items()}
    return value


def check_precision(meta: dict, where: str = "model.json") -> None:
    """An int8 package names its fp32 source and its parity with it (`quantization`): without them nothing says what its
    scores were checked against. Only quantisation writes that block, always with precision int8: an fp32 package
    holding one would be served and quantised again as the source it says it was made from. Apart from
    validate_model_json because quantisation validates the int8 model.json it builds before the parity that completes
    the block has been measured; a package on disk is complete."""
    precision = meta.get("precision", "fp32")  # absent: fp32 (the schema)
    if precision != "int8" and "quantization" in meta:
        raise PackageError(
            f"model.json has a 'quantization' block but says precision '{precision}'"
            f"{'' if 'precision' in meta else ' (by leaving it out)'}: the block describes an int8 graph made from an fp32 "
            "source, so model.json contradicts itself about which graph this is",
            where=where,
            hint="restore the package as written: an int8 package from medtriage quantize (precision 'int8'), or its fp32 "
            "source package, which has no such block",
        )
    if meta.get("precision") == "int8" and "quantization" not in meta:
        raise PackageError(
            "model.json says precision 'int8' but has no 'quantization' block (its fp32 source, calibration images and "
            "parity with the source): nothing says what its scores were checked against",
            where=where,
            hint="quantise the fp32 source package again: medtriage quantize <fp32 package> --calibration <validation images>",
        )


def validate_model_json(meta: dict, where: str = "model.json") -> None:
    """Raise PackageError listing every schema violation of a package's metadata."""
    errors = schema_errors(meta) or consistency_errors(meta)
    if errors:
        raise PackageError(
            "model.json does not follow the package schema: " + "; ".join(errors[:8]) + (" ..." if len(errors) > 8 else ""),
            where=where,
            hint="re-export the model with this medtriage version (python scripts/export.py run_id=<run>)",
        )
