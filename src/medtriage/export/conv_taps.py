"""Drop the kernel taps of a convolution that only ever read padding.

Deep in a network the feature maps get smaller than the kernels: a 3x3 convolution with padding 1 on a
1x1 map reads one real pixel and eight padded zeros at every output. ONNX Runtime's float NCHWc kernels
skip such taps themselves; its int8 convolution (im2col + integer GEMM) multiplies them all. Where shape
inference proves a convolution's input size (the package graph resizes every image to one size first),
its weights are cut to the taps that can touch real pixels and its padding adjusted, so the output is
exactly the same, with fewer multiplications.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AxisCut:
    first: int  # first kept tap
    last: int  # last kept tap (inclusive)
    pad_begin: int
    pad_end: int


def used_taps(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int = 1) -> AxisCut | None:
    """The taps of one axis that read a real input pixel at some output position, with the padding that keeps
    the output size; None when every tap is used or the cut would need negative padding."""
    outputs = (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1
    used = [j for j in range(kernel) if any(0 <= o * stride - pad_begin + j * dilation < size for o in range(outputs))]
    if not used or (used[0] == 0 and used[-1] == kernel - 1):
        return None
    first, last = used[0], used[-1]
    cut = AxisCut(first, last, pad_begin - first * dilation, pad_end - (kernel - 1 - last) * dilation)
    return cut if cut.pad_begin >= 0 and cut.pad_end >= 0 else None


def trim_padded_taps(model) -> list[str]:
    """Cut, in place, the weights of every Conv of `model` (an onnx ModelProto with inferred shapes) whose
    input height and width are known and whose kernel reaches only padding at some taps; returns their names."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    shapes = {v.name: v.type.tensor_type.shape for v in [*graph.value_info, *graph.input]}
    inputs = {v.name for v in graph.input}  # a weight that is also a graph input can be fed another shape: leave it
    weights = {t.name: t for t in graph.initializer if t.name not in inputs}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    trimmed = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights or users[node.input[1]] != 1:
            continue
        spatial = _spatial_size(shapes.get(node.input[0]))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if spatial is None or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        kernel = numpy_helper.to_array(weights[node.input[1]])
        pads = list(attrs.get("pads", [0] * 4))
        strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
        cuts = [used_taps(spatial[i], kernel.shape[2 + i], strides[i], pads[i], pads[2 + i], dilations[i]) for i in range(2)]
        if cuts == [None, None]:
            continue
        full = [AxisCut(0, kernel.shape[2 + i] - 1, pads[i], pads[2 + i]) for i in range(2)]
        rows, cols = (cut or whole for cut, whole in zip(cuts, full))
        cut_kernel = np.ascontiguousarray(kernel[:, :, rows.first : rows.last + 1, cols.first : cols.last + 1])
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(cut_kernel, node.input[1]))
        _set_ints(node, "kernel_shape", list(cut_kernel.shape[2:]))
        _set_ints(node, "pads", [rows.pad_begin, cols.pad_begin, rows.pad_end, cols.pad_end])
        trimmed.append(node.name)
    stale = {weights_name for node in graph.node if node.name in trimmed for weights_name in node.input[1:2]}
    kept = [v for v in graph.value_info if v.name not in stale]  # the old kernel shapes would contradict the new
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return trimmed


def _spatial_size(shape) -> tuple[int, int] | None:
    if shape is None or len(shape.dim) != 4:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim[2:]]
    return None if None in dims else (dims[0], dims[1])


def _set_ints(node, name: str, values: list[int]) -> None:
    import onnx

    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(name, values)])
