"""A package's graph against its model.json: what the graph takes and returns must be what model.json says, or every
image would fail (or another output be served). Checked by the export before a package is written, by load_package
from model.onnx's header, and by the predictor on the ONNX Runtime session it runs."""

from __future__ import annotations

from pathlib import Path

from medtriage.errors import PackageError
from medtriage.format.onnx_header import graph_header
from medtriage.format.schema import INPUT_AXES

# model.json's `input.dtype` as ONNX Runtime names the element type of a graph input
ORT_TYPES = {"float32": "tensor(float)"}
REEXPORT_HINT = "restore the package from the MLflow run or model registry, or re-export it: python scripts/export.py run_id=<run>"


def check_graph_file(meta: dict, onnx_path: Path, where: str | Path) -> None:
    """check_graph on what model.onnx's header says of its inputs and outputs, without building a session. A file that
    reads as no ONNX model is passed over: ONNX Runtime says why when a predictor starts."""
    header = graph_header(onnx_path)
    if header is not None:
        check_graph(meta, header, where)


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
