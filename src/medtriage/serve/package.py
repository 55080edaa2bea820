"""Load a model package: `model.json` checked against its schema, `model.onnx` against its sha256."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import medtriage
from medtriage.errors import PackageError
from medtriage.format import (
    INPUT_AXES,
    META_FILE,
    ONNX_FILE,
    SCHEMA_VERSION,
    meta_bytes,
    sha256_file,
    temperature_applied,
    validate_model_json,
)
from medtriage.format.onnx_header import graph_header
from medtriage.format.schema import check_precision, integers_as_int

# model.json's `input.dtype` as ONNX Runtime names the element type of a graph input
ORT_TYPES = {"float32": "tensor(float)"}
REEXPORT_HINT = "restore the package from the MLflow run or model registry, or re-export it: python scripts/export.py run_id=<run>"


@dataclass(frozen=True)
class ModelPackage:
    directory: Path
    meta: dict

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILE

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def version(self) -> int:
        return int(self.meta["version"])

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    @property
    def label_names(self) -> list[str]:
        return list(self.meta["label_names"])

    @property
    def positive_label(self) -> str:
        return self.meta["positive_label"]

    @property
    def input_name(self) -> str:
        """The graph input that takes the pixels (model.json's `input.name`)."""
        return self.meta["input"]["name"]

    @property
    def output_name(self) -> str:
        """The graph output that holds the probabilities (model.json's `output.name`)."""
        return self.meta["output"]["name"]

    @property
    def channels(self) -> int:
        return int(self.meta["input"]["channels"])

    @property
    def review_threshold(self) -> float:
        return served_threshold(self.meta["thresholds"]["review"]["threshold"])

    @property
    def urgent_threshold(self) -> float | None:
        urgent = self.meta["thresholds"].get("urgent")
        return served_threshold(urgent["threshold"]) if urgent else None

    @property
    def calibrated(self) -> bool:
        """Whether the probabilities served are calibrated (format.temperature_applied, the rule behind export's
        `output.calibrated` and the model card's wording). A package exported before that rule could flag raw
        probabilities calibrated, so the method decides; a false flag stands."""
        return temperature_applied(self.meta["calibration"]) and self.meta["output"].get("calibrated", True) is not False

    @property
    def scope(self) -> dict | None:
        """What the model may be shown (serve/scope.py); None in packages exported before scopes existed."""
        return self.meta.get("scope")

    @property
    def ood_output(self) -> str | None:
        return (self.meta.get("ood") or {}).get("output")

    @property
    def ood_threshold(self) -> float | None:
        threshold = (self.meta.get("ood") or {}).get("threshold")
        return None if threshold is None else float(threshold)

    def describe(self, with_sha: bool = True) -> str:
        """'pneumonia-r18 v3 (sha256 4be1…)', the model column of a result."""
        return identity_label(self.identity(), sha_chars=4 if with_sha else 0)

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def scored_by(result: dict) -> dict:
    """The identity, in ModelPackage.identity()'s form, of the package that scored a result (Score.as_dict())."""
    return {"name": result["model"], "version": result["version"], "sha256": result["sha256"]}


def calibrated_result(result: dict, package: ModelPackage) -> bool | None:
    """Whether a result's probability (Score.as_dict()) is calibrated: as the result recorded it, else as `package`
    says where it scored the result; None (not known) for a result of another package stored before scores said."""
    if result.get("calibrated") is not None:
        return result["calibrated"]
    return package.calibrated if scored_by(result) == package.identity() else None


def identity_label(identity: dict, sha_chars: int = 0) -> str:
    """'pneumonia-r18 v3', followed by ' (sha256 4be1…)' with `sha_chars` of the model's digest."""
    text = f"{identity['name']} v{identity['version']}"
    return f"{text} (sha256 {identity['sha256'][:sha_chars]}…)" if sha_chars else text


def picture_refused(scoring: dict, served: dict) -> str | None:
    """Why the served package may not draw the picture of an image another package scored (identities as above);
    None when it scored it. A picture from another model would not show where the scoring model looked."""
    if scoring == served:
        return None
    return (
        f"the image was scored by {identity_label(scoring, 12)} and the service now runs {identity_label(served, 12)}; "
        "a picture drawn by another model would not show where the scoring model looked"
    )


def served_threshold(threshold: float) -> float:
    """An operating point's threshold as served probabilities meet it: its nearest float32. It was chosen among
    float64 validation scores, but ONNX Runtime serves float32 probabilities, and a score at the threshold may round
    below it, to a lower priority than validation gave it. Rounding keeps order, so against the rounded threshold
    every validation score at or above the threshold stays at or above it, and every one below stays below unless
    float32 cannot tell it from the threshold. Both sides being float32 values, `p >= threshold` is then the float32
    comparison."""
    return float(np.float32(threshold))


def load_package(directory: str | Path) -> ModelPackage:
    """Read and verify `directory`; raise PackageError saying what is wrong and what to do."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PackageError(
            "model package folder not found",
            where=directory,
            hint="pass the folder that holds model.onnx and model.json, e.g. models/pneumonia-r18",
        )
    meta = integers_as_int(_read_meta(directory / META_FILE))  # a tile_size of 48.0 would fail deep in slide scoring
    _check_schema_version(meta, directory / META_FILE)
    validate_model_json(meta, where=directory / META_FILE)
    check_precision(meta, where=directory / META_FILE)
    onnx_path = directory / ONNX_FILE
    if not onnx_path.is_file():
        raise PackageError("model.onnx is missing", where=directory, hint=REEXPORT_HINT)
    actual = sha256_file(onnx_path)
    if actual != meta["sha256"]:
        raise PackageError(
            f"model.onnx does not match its recorded sha256 (model.json says {meta['sha256'][:12]}…, "
            f"the file hashes to {actual[:12]}…): the model was changed or corrupted after export; refusing to load it",
            where=onnx_path,
            hint=REEXPORT_HINT,
        )
    # From the graph's header, not an ONNX Runtime session: tools that only load a package (inspect, verify, bundling,
    # the service's listing) refuse what a predictor would, and the graph is built once, when a predictor starts.
    header = graph_header(onnx_path)
    if header is not None:  # no ONNX model: ONNX Runtime says why when a predictor starts
        check_graph(meta, header, where=directory)
    return ModelPackage(directory, meta)


def check_graph(meta: dict, graph: dict, where: str | Path) -> None:
    """Refuse a graph that does not take or return what model.json says. `graph`: its `inputs` (name -> `shape` and
    element `type`) and `outputs` (name -> shape), as graph_header reads them from model.onnx or as an ONNX Runtime
    session lists them."""
    _check_input_name(meta, list(graph["inputs"]), where)
    _check_no_other_input(meta, list(graph["inputs"]), where)
    fed = graph["inputs"][meta["input"]["name"]]
    _check_input_shape(meta, fed["shape"], where)
    _check_input_type(meta, fed["type"], where)
    _check_output(meta, graph["outputs"], where)
    _check_ood_output(meta, list(graph["outputs"]), where)


def _check_input_name(meta: dict, inputs: list[str], where: str | Path) -> None:
    """Pixels are fed by model.json's `input.name`: a graph without that input would fail every image."""
    name = meta["input"]["name"]
    if name not in inputs:
        raise PackageError(
            f"model.json names the input '{name}', which model.onnx does not take (its inputs: {', '.join(map(repr, inputs))})",
            where=where,
            hint=f"the package's files do not belong together; {REEXPORT_HINT}",
        )


def _check_no_other_input(meta: dict, inputs: list[str], where: str | Path) -> None:
    """Only model.json's `input.name` is fed: a graph that needs another input would fail every image. `inputs` are
    those it needs (an input backed by an initializer has that as its default and is listed by neither graph_header
    nor an ONNX Runtime session)."""
    others = [name for name in inputs if name != meta["input"]["name"]]
    if others:
        raise PackageError(
            f"model.onnx also needs the input{'s' if len(others) > 1 else ''} {', '.join(map(repr, others))}, which "
            f"model.json does not name (only '{meta['input']['name']}' is fed, with the pixels): every image would fail",
            where=where,
            hint=f"a graph takes the pixels as its one input (any other needs a default, an initializer of its name); {REEXPORT_HINT}",
        )


def _check_input_shape(meta: dict, shape: list | None, where: str | Path) -> None:
    """Refuse a graph whose input (`shape`: an int per fixed dimension, anything else for a free one; None when
    unknown) disagrees with model.json's `input`: pixels are prepared by model.json, so every image would fail."""
    declared = meta.get("input")
    if shape is None or not isinstance(declared, dict):
        return
    if len(shape) != len(INPUT_AXES):
        raise PackageError(
            f"model.onnx takes a {len(shape)}-dimensional input, model.json declares {'/'.join(INPUT_AXES)} images",
            where=where,
            hint=REEXPORT_HINT,
        )
    for axis, size in zip(INPUT_AXES, shape):
        wanted = declared.get(axis)
        if isinstance(size, int) and wanted is not None and wanted != size:
            raise PackageError(
                f"model.json declares {axis}={wanted!r} for the input, model.onnx takes {axis}={size} only: every image would fail",
                where=where,
                hint=f"the package's files do not belong together; {REEXPORT_HINT}",
            )


def _check_input_type(meta: dict, element_type: str | None, where: str | Path) -> None:
    """Refuse a graph whose input (`element_type` as ONNX Runtime names it, e.g. 'tensor(float)'; None when unknown) is
    not model.json's `input.dtype`: pixels are fed as model.json says, so every image would fail."""
    declared = meta["input"]["dtype"]
    if element_type is not None and ORT_TYPES.get(declared) != element_type:
        raise PackageError(
            f"model.onnx takes {element_type} pixels, model.json declares {declared}: every image would fail",
            where=where,
            hint=f"the package's files do not belong together; {REEXPORT_HINT}",
        )


def _check_output(meta: dict, outputs: dict[str, list | None], where: str | Path) -> None:
    """Refuse a graph (`outputs`: each output's name and shape, as ONNX Runtime reports them) without the output
    model.json names, or whose class axis, where fixed, is not model.json's `output.classes`: another output would be
    served as probabilities, or every image would fail."""
    name, classes = meta["output"]["name"], meta["output"]["classes"]
    if name not in outputs:
        raise PackageError(
            f"model.json names the output '{name}', which model.onnx does not have ({', '.join(outputs)})",
            where=where,
            hint=f"the package's files do not belong together; {REEXPORT_HINT}",
        )
    shape = outputs[name]
    if not shape:  # None or [], as ONNX Runtime reports an output of undeclared shape: checked image by image
        return
    fixed = shape[-1] if len(shape) == 2 and isinstance(shape[-1], int) else None
    if len(shape) != 2 or fixed not in (None, classes):
        got = f"{fixed} per image" if fixed is not None else f"a {len(shape)}-dimensional '{name}' (batch, classes expected)"
        raise PackageError(
            f"model.json declares {classes} classes, model.onnx returns {got}: every image would fail",
            where=where,
            hint=f"the package's files do not belong together; {REEXPORT_HINT}",
        )


def _check_ood_output(meta: dict, outputs: list[str], where: str | Path) -> None:
    """The OOD output model.json declares must be in the graph: without it every unusual image would be scored,
    with no word that the check is off."""
    declared = (meta.get("ood") or {}).get("output")
    if declared and declared not in outputs:
        raise PackageError(
            f"model.json declares the OOD output '{declared}', which model.onnx does not have ({', '.join(outputs)})",
            where=where,
            hint=REEXPORT_HINT,
        )


def _check_schema_version(meta: dict, where: Path) -> None:
    """A package from a newer medtriage would otherwise fail the schema check with advice to re-export it here."""
    version = meta.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        provenance = meta.get("provenance")
        written_by = provenance.get("medtriage_version", "unknown") if isinstance(provenance, dict) else "unknown"
        raise PackageError(
            f"model.json has package schema version {version}, written by medtriage {written_by}; this medtriage "
            f"({medtriage.__version__}) reads schema version {SCHEMA_VERSION} and cannot load it",
            where=where,
            hint=f"upgrade medtriage on this machine to {written_by} or later, or export the model with medtriage {medtriage.__version__}",
        )


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise PackageError("model.json is missing", where=path.parent, hint=REEXPORT_HINT)
    try:
        meta = json.loads(meta_bytes(path, f"copy the package folder again from where it came from; {REEXPORT_HINT}").decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise PackageError(f"model.json is not valid JSON ({err})", where=path, hint=REEXPORT_HINT) from err
    if not isinstance(meta, dict):
        raise PackageError("model.json must hold a JSON object", where=path, hint=REEXPORT_HINT)
    return meta
