"""What model.onnx says of itself (opset, input and output shapes), read without the onnx library: export checks the
graph it wrote with it, serve the graph it is given."""

from __future__ import annotations

import mmap
from pathlib import Path

# ONNX protobuf field numbers (onnx.proto) on the way to the graph's opset and input and output shapes: ModelProto.graph
# and .opset_import, OperatorSetIdProto.domain and .version, GraphProto.initializer, .input and .output,
# TensorProto.name, ValueInfoProto.name and .type, TypeProto.tensor_type, its .elem_type and .shape, the shape's .dim,
# and a dimension's dim_value and dim_param.
_GRAPH, _OPSET_IMPORT, _OPSET_DOMAIN, _OPSET_VERSION = 7, 8, 1, 2
_INITIALIZER, _INPUT, _OUTPUT, _TENSOR_NAME, _VALUE_NAME, _VALUE_TYPE = 5, 11, 12, 8, 1, 2
_TENSOR_TYPE, _ELEM_TYPE, _SHAPE, _DIM, _DIM_VALUE, _DIM_PARAM = 1, 1, 2, 1, 1, 2
# TensorProto.DataType's numbers, named as ONNX Runtime names an input's type (NodeArg.type), so that what the header
# says and what a session says are checked alike
ORT_ELEMENT_TYPES = {
    1: "tensor(float)",
    2: "tensor(uint8)",
    3: "tensor(int8)",
    4: "tensor(uint16)",
    5: "tensor(int16)",
    6: "tensor(int32)",
    7: "tensor(int64)",
    8: "tensor(string)",
    9: "tensor(bool)",
    10: "tensor(float16)",
    11: "tensor(double)",
    12: "tensor(uint32)",
    13: "tensor(uint64)",
    16: "tensor(bfloat16)",
}


def graph_header(onnx_path: Path) -> dict | None:
    """What model.onnx says of itself: `opset` (its default domain's), the shape of the `input` ONNX Runtime feeds (its
    first graph input that is no initializer) and of its first `output`, each an int per fixed dimension and a name ('' if
    none) per free one, None where it declares none; and, as an ONNX Runtime session lists them, every input it feeds
    (`inputs`: name -> its `shape` and element `type`, e.g. 'tensor(float)', None where undeclared) and every output
    (`outputs`: name -> shape). None where the file reads as no ONNX model. The onnx library is training-side, so the
    few protobuf fields on the way are read here, through a memory map: the weights are stepped over, never read."""
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
        "inputs": {_text(data, span, _VALUE_NAME): {"shape": _shape(data, span), "type": _element_type(data, span)} for span in fed},
        "outputs": {_text(data, span, _VALUE_NAME): _shape(data, span) for span in outputs},
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
    tensor = _tensor_type(data, value_info)
    shapes = _messages(data, tensor, _SHAPE) if tensor else []
    return [_dimension(data, dim) for dim in _messages(data, shapes[-1], _DIM)] if shapes else None


def _element_type(data, value_info: tuple[int, int]) -> str | None:
    """The element type of a tensor input, as ONNX Runtime names it; None where the graph declares none."""
    tensor = _tensor_type(data, value_info)
    types = [value for number, wire, value in _fields(data, *tensor) if number == _ELEM_TYPE and wire == 0] if tensor else []
    if not types or not types[-1]:  # 0: UNDEFINED
        return None
    return ORT_ELEMENT_TYPES.get(types[-1], f"tensor(type {types[-1]})")


def _tensor_type(data, value_info: tuple[int, int]) -> tuple[int, int] | None:
    """The span of a ValueInfoProto's TypeProto.tensor_type; None where it has none (a sequence or map)."""
    span = value_info
    for number in (_VALUE_TYPE, _TENSOR_TYPE):
        found = _messages(data, span, number)
        if not found:
            return None
        span = found[-1]
    return span


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
