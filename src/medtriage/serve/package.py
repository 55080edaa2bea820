"""Load a model package: `model.json` checked against its schema, `model.onnx` against its sha256."""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import medtriage
from medtriage.errors import PackageError
from medtriage.format import META_FILE, ONNX_FILE, SCHEMA_VERSION, sha256_file, validate_model_json

REEXPORT_HINT = "restore the package from the MLflow run or model registry, or re-export it: python scripts/export.py run_id=<run>"
INPUT_AXES = ("batch", "channels", "height", "width")  # model.json's `input` keys, in the graph's NCHW order
# ONNX protobuf field numbers (onnx.proto) on the way to the graph's opset and input and output shapes: ModelProto.graph
# and .opset_import, OperatorSetIdProto.domain and .version, GraphProto.initializer, .input and .output,
# TensorProto.name, ValueInfoProto.name and .type, TypeProto.tensor_type, its .shape, the shape's .dim, and a
# dimension's dim_value and dim_param.
_GRAPH, _OPSET_IMPORT, _OPSET_DOMAIN, _OPSET_VERSION = 7, 8, 1, 2
_INITIALIZER, _INPUT, _OUTPUT, _TENSOR_NAME, _VALUE_NAME, _VALUE_TYPE = 5, 11, 12, 8, 1, 2
_TENSOR_TYPE, _SHAPE, _DIM, _DIM_VALUE, _DIM_PARAM = 1, 2, 1, 1, 2


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
    meta = _read_meta(directory / META_FILE)
    _check_schema_version(meta, directory / META_FILE)
    validate_model_json(meta, where=directory / META_FILE)
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
    check_input_shape(meta, graph_input_shape(onnx_path), where=directory)
    return ModelPackage(directory, meta)


def check_input_shape(meta: dict, shape: list | None, where: str | Path) -> None:
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


def graph_input_shape(onnx_path: Path) -> list[int | str] | None:
    """The shape model.onnx declares for the input ONNX Runtime feeds (graph_header's `input`); None where the file
    reads as no ONNX model or declares no shape."""
    header = graph_header(onnx_path)
    return header["input"] if header else None


def graph_header(onnx_path: Path) -> dict | None:
    """What model.onnx says of itself: `opset` (its default domain's), the shape of the `input` ONNX Runtime feeds (its
    first graph input that is no initializer) and of its first `output`, each an int per fixed dimension and a name ('' if
    none) per free one, None where it declares none. None where the file reads as no ONNX model. The onnx library is
    training-side, so the few protobuf fields on the way are read here, through a memory map: the weights are stepped
    over, never read."""
    try:
        with open(onnx_path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _header(data)
    except (OSError, ValueError, IndexError):  # unreadable, empty (mmap) or not protobuf: ONNX Runtime will say why
        return None


def _header(data) -> dict | None:
    model = (0, len(data))
    graphs = _messages(data, model, _GRAPH)
    if not graphs:
        return None
    inputs, outputs, initializers = [], [], set()
    for number, wire, value in _fields(data, *graphs[-1]):
        if wire == 2 and number == _INPUT:
            inputs.append(value)
        elif wire == 2 and number == _OUTPUT:
            outputs.append(value)
        elif wire == 2 and number == _INITIALIZER:  # listed as inputs too by graphs of ONNX IR version 3 and older
            initializers.add(_text(data, value, _TENSOR_NAME))
    fed = [span for span in inputs if _text(data, span, _VALUE_NAME) not in initializers]
    return {
        "opset": _default_opset(data, model),
        "input": _shape(data, fed[0]) if fed else None,
        "output": _shape(data, outputs[0]) if outputs else None,
    }


def _default_opset(data, model: tuple[int, int]) -> int | None:
    """The version of the first opset import of the default domain ('' or 'ai.onnx'); 0, protobuf's default, where
    that import names none."""
    for span in _messages(data, model, _OPSET_IMPORT):
        if _text(data, span, _OPSET_DOMAIN) in ("", "ai.onnx"):
            versions = [value for number, wire, value in _fields(data, *span) if number == _OPSET_VERSION and wire == 0]
            return versions[-1] if versions else 0  # protobuf: the last of a repeated scalar field wins
    return None


def _shape(data, value_info: tuple[int, int]) -> list[int | str] | None:
    span = value_info
    for number in (_VALUE_TYPE, _TENSOR_TYPE, _SHAPE):
        found = _messages(data, span, number)
        if not found:
            return None
        span = found[-1]
    return [_dimension(data, dim) for dim in _messages(data, span, _DIM)]


def _dimension(data, span: tuple[int, int]) -> int | str:
    for number, wire, value in _fields(data, *span):
        if number == _DIM_VALUE and wire == 0 and value < 1 << 63:  # int64: a negative size is no fixed one
            return value
    return _text(data, span, _DIM_PARAM)


def _messages(data, span: tuple[int, int], number: int) -> list[tuple[int, int]]:
    """The (start, end) of each length-delimited field `number` in the message at `span`."""
    return [value for n, wire, value in _fields(data, *span) if n == number and wire == 2]


def _text(data, span: tuple[int, int], number: int) -> str:
    found = _messages(data, span, number)
    return bytes(data[found[-1][0] : found[-1][1]]).decode("utf-8", "replace") if found else ""


def _fields(data, start: int, end: int):
    """(number, wire type, value) of each protobuf field in data[start:end]: an int for a varint, the (start, end)
    of a length-delimited field's bytes, None for a fixed-width one. ValueError or IndexError where it is no protobuf."""
    position = start
    while position < end:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 2:
            length, position = _varint(data, position)
            value, position = (position, position + length), position + length
        elif wire in (1, 5):
            value, position = None, position + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire} is not read here")
        if position > end:
            raise ValueError("a protobuf field runs past the end of its message")
        yield number, wire, value


def _varint(data, position: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
    raise ValueError("a protobuf varint longer than 10 bytes")


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
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise PackageError(f"model.json is not valid JSON ({err})", where=path, hint=REEXPORT_HINT) from err
    if not isinstance(meta, dict):
        raise PackageError("model.json must hold a JSON object", where=path, hint=REEXPORT_HINT)
    return meta
