"""float16 explainer graphs: the same graph computing in float16, its interface in float32.

``to_float16`` rewrites a float32 graph (explainer, saliency or head companion) so that
every tensor that was float32 inside it is float16 -- weights, activations, the adjoint --
while the graph's float32 inputs and outputs keep their names, types and shapes (graph
contract v1 does not change, nor do the server and its clients):

    image float32 ─Cast─► image.float16 ─ ... float16 ... ─► logits.float16 ─Cast─► logits float32

Since every float32 tensor becomes float16 the graph stays type-consistent: the float32
sources are rewritten (float initializers, ``Constant`` and ``ConstantOfShape`` values,
``Cast(to=FLOAT)``, ``dtype`` attributes), and whatever computes from them follows. Integer
and boolean tensors (``targets``, ``classes``, TopK's indices, OneHot's depth, shapes, masks)
are untouched. ``Scan`` bodies (the per-sample adjoint of a head with convolutions) are
rewritten the same way: their float inputs and outputs become float16 with the outer
tensors they are bound to. Inputs that the ONNX operator set wants as float32 whatever the
data type (``Resize``'s roi and scales, ``Upsample``'s scales) get a Cast back to float32.

Weights are rounded to the nearest float16; magnitudes above its largest finite value
(65504) are clipped to it, and below its smallest subnormal (6e-8) they become 0.

Gradients are small: Grad-CAM's through a global average pool are the classifier's weights
divided by h*w, and one convolution further back many fall below float16's smallest normal
number (6.1e-5), where it keeps fewer significant bits (a 1e-6 is off by up to 3%). As in
mixed-precision training, the adjoint is run on scaled seeds: the one-hot seeds are
multiplied by ``GRADIENT_SCALE`` (2^10, exact in float16) and the gradient outputs divided
by it after their Cast to float32 (exact too), which lifts them out of the subnormal range;
the largest adjoint value in our graphs stays far below float16's limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from camserve import contract
from camserve.errors import OperatorError
from camserve.export.common import subgraph_reads
from camserve.onnxgraph import iter_graphs, stored_tensors

SUFFIX = ".float16"  # internal name of a float32 input or output's float16 twin
_FLOAT32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}  # float32 whatever the data type
# Run in float32 between Casts: the scatter-add of the MaxPool adjoint (onnxruntime's CPU
# provider has no float16 ScatterND with reduction, and float32 sums are more exact).
_FLOAT32_OPS = {"ScatterND": (0, 2), "ScatterElements": (0, 2)}  # op: its float inputs
_FLOAT_BY_DEFAULT = ("RandomNormal", "RandomUniform")  # float32 when ``dtype`` is not given
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class PrecisionError(OperatorError):
    """The graph cannot be rewritten in float16."""


GRADIENT_SCALE = 2.0 ** 10


def to_float16(model: onnx.ModelProto, gradients: Sequence[str] = ()) -> onnx.ModelProto:
    """A float16 copy of ``model`` with the same float32 interface (see the module doc).

    ``gradients`` names the outputs computed from the one-hot seeds (the ``OneHot`` nodes of
    the graph): they are computed from seeds scaled by ``GRADIENT_SCALE`` and scaled back.
    Raises PrecisionError when the result fails ONNX's type checking.
    """
    model = _copy(model)
    graph = model.graph
    if gradients:
        _scale_seeds(model, gradients)
    interface = {value.name for value in [*graph.input, *graph.output]}
    kept = [value for value in graph.value_info if value.name not in interface]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for value in graph.value_info:
        _to_float16_type(value)
    _rewrite(graph, top_level=True)
    head: list[onnx.NodeProto] = []
    for value in graph.input:
        if _is_float(value):
            inner = value.name + SUFFIX
            _rename_uses(graph, value.name, inner)
            head.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT16,
                                         name=f"cast_{inner}"))
    tail: list[onnx.NodeProto] = []
    for value in graph.output:
        if _is_float(value):
            inner = value.name + SUFFIX
            _rename_producer(graph, value.name, inner)
            _rename_uses(graph, value.name, inner)
            tail.extend(_back_to_float32(inner, value.name, value.name in gradients))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PrecisionError(f"the float16 graph fails ONNX's checks: "
                             f"{str(exc).strip().splitlines()[0]}") from exc
    return model


def _back_to_float32(inner: str, name: str, scaled: bool) -> list[onnx.NodeProto]:
    """``name`` = float32(``inner``), divided by ``GRADIENT_SCALE`` when ``scaled``."""
    if not scaled:
        return [helper.make_node("Cast", [inner], [name], to=TensorProto.FLOAT,
                                 name=f"cast_{name}")]
    unscale = f"{name}.unscale"
    return [helper.make_node("Constant", [], [unscale], value=numpy_helper.from_array(
                np.array(1 / GRADIENT_SCALE, np.float32), unscale)),
            helper.make_node("Cast", [inner], [f"{name}.scaled"], to=TensorProto.FLOAT,
                             name=f"cast_{name}"),
            helper.make_node("Mul", [f"{name}.scaled", unscale], [name], name=unscale)]


def _scale_seeds(model: onnx.ModelProto, gradients: Sequence[str]) -> None:
    """Multiply the adjoint's sources by ``GRADIENT_SCALE``: every float tensor that a node
    makes from ``classes`` (directly, or through integer tensors computed from it), i.e. the
    one-hot seeds or the classifier's weight rows gathered for them. The adjoint is linear
    in them, so every tensor computed from them -- only the ``gradients`` outputs, checked --
    comes out scaled by the same factor."""
    graph = model.graph
    types = {value.name: value.type.tensor_type.elem_type
             for value in onnx.shape_inference.infer_shapes(model).graph.value_info}
    types |= {tensor.name: tensor.data_type for tensor in graph.initializer}
    types |= {value.name: value.type.tensor_type.elem_type
              for value in [*graph.input, *graph.output]}
    from_classes, sources = {contract.CLASSES}, []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if not from_classes.intersection(node.input):
            continue
        if not any(types.get(name) == TensorProto.FLOAT for name in node.output):
            from_classes.update(node.output)
            continue
        for position, name in enumerate(node.output):
            scale = f"{name}.scale"
            node.output[position] = f"{name}.unscaled"
            nodes += [helper.make_node("Constant", [], [scale], value=numpy_helper.from_array(
                          np.array(GRADIENT_SCALE, np.float32), scale)),
                      helper.make_node("Mul", [node.output[position], scale], [name],
                                       name=scale)]
            sources.append(name)
    reached = _outputs_reached(graph, sources)
    if not sources or reached - set(gradients):
        raise PrecisionError(f"cannot scale the gradients: the tensors made from "
                             f"{contract.CLASSES!r} ({', '.join(sources) or 'none'}) reach "
                             f"the outputs {sorted(reached)}, not just {list(gradients)}")
    del graph.node[:]
    graph.node.extend(nodes)


def _outputs_reached(graph: onnx.GraphProto, names: list[str]) -> set[str]:
    """The graph outputs computed from any of ``names`` (subgraph reads included)."""
    reached = set(names)
    for node in graph.node:  # (nodes are in topological order)
        reads = set(node.input) | subgraph_reads([node])
        if reached & reads:
            reached.update(node.output)
    return reached & {value.name for value in graph.output}


def stored_types(model: onnx.ModelProto) -> set[int]:
    """The data types (``TensorProto.FLOAT16``, ...) of the tensors stored in the graph and
    its subgraphs: initializers and node attributes (``Constant`` values)."""
    return {tensor.data_type for tensor in stored_tensors(model.graph)}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _rewrite(graph: onnx.GraphProto, top_level: bool) -> None:
    """Every float32 source in ``graph`` (and in its subgraphs) becomes float16."""
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            graph.initializer[index].CopyFrom(_tensor_to_float16(tensor))
    if not top_level:  # a subgraph's inputs and outputs are bound to float16 outer tensors
        for value in [*graph.input, *graph.output, *graph.value_info]:
            _to_float16_type(value)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.extend(_float32_inputs(node))
        _rewrite_node(node)
        nodes.append(node)
        nodes.extend(_float16_outputs(node))
    del graph.node[:]
    graph.node.extend(nodes)


def _rewrite_node(node: onnx.NodeProto) -> None:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.TENSOR and \
                attribute.t.data_type == TensorProto.FLOAT:
            attribute.t.CopyFrom(_tensor_to_float16(attribute.t))
        elif attribute.type == onnx.AttributeProto.GRAPH:
            _rewrite(attribute.g, top_level=False)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for sub in attribute.graphs:
                _rewrite(sub, top_level=False)
        elif attribute.name in ("to", "dtype") and attribute.i == TensorProto.FLOAT:
            attribute.i = TensorProto.FLOAT16
    names = {attribute.name for attribute in node.attribute}
    for attribute in list(node.attribute):
        if node.op_type == "Constant" and attribute.name in ("value_float", "value_floats"):
            values = attribute.f if attribute.name == "value_float" else list(attribute.floats)
            node.attribute.remove(attribute)
            node.attribute.append(helper.make_attribute(
                "value", _tensor_to_float16(numpy_helper.from_array(np.array(values,
                                                                             np.float32)))))
    if node.op_type == "ConstantOfShape" and "value" not in names:  # default: float32 0
        node.attribute.append(helper.make_attribute(
            "value", numpy_helper.from_array(np.zeros(1, np.float16))))
    elif node.op_type in _FLOAT_BY_DEFAULT and "dtype" not in names:
        node.attribute.append(helper.make_attribute("dtype", TensorProto.FLOAT16))


def _float32_inputs(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Casts to float32 in front of the inputs that ONNX wants in float32, or that an op
    kept in float32 reads (the node is re-pointed to them)."""
    casts = []
    positions = _FLOAT32_INPUTS.get(node.op_type, ()) or _FLOAT32_OPS.get(node.op_type, ())
    for position in positions:
        if position < len(node.input) and node.input[position]:
            name = f"{node.input[position]}.float32.{node.output[0]}.{position}"
            casts.append(helper.make_node("Cast", [node.input[position]], [name],
                                          to=TensorProto.FLOAT, name=f"cast_{name}"))
            node.input[position] = name
    return casts


def _float16_outputs(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """For an op kept in float32: its output renamed, and a Cast back to float16 under the
    old name."""
    if node.op_type not in _FLOAT32_OPS:
        return []
    name = node.output[0]
    node.output[0] = f"{name}.float32"
    return [helper.make_node("Cast", [node.output[0]], [name], to=TensorProto.FLOAT16,
                             name=f"cast_{name}")]


def _tensor_to_float16(tensor: onnx.TensorProto) -> onnx.TensorProto:
    values = numpy_helper.to_array(tensor)
    clipped = np.clip(values, -_FLOAT16_MAX, _FLOAT16_MAX)  # inf stays inf, nan stays nan
    out = numpy_helper.from_array(clipped.astype(np.float16), tensor.name)
    out.doc_string = tensor.doc_string
    return out


def _is_float(value: onnx.ValueInfoProto) -> bool:
    return value.type.tensor_type.elem_type == TensorProto.FLOAT


def _to_float16_type(value: onnx.ValueInfoProto) -> None:
    if _is_float(value):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node reading ``old`` reads ``new``, in subgraphs too (outer-scope reads, and a
    body output that passes the outer tensor straight through)."""
    for index, sub in enumerate(iter_graphs(graph)):
        for node in sub.node:
            for position, name in enumerate(node.input):
                if name == old:
                    node.input[position] = new
        if index:
            for value in sub.output:
                if value.name == old:
                    value.name = new


def _rename_producer(graph: onnx.GraphProto, old: str, new: str) -> None:
    """The node that makes ``old`` makes ``new`` instead."""
    for node in graph.node:
        for position, name in enumerate(node.output):
            if name == old:
                node.output[position] = new
                return
    raise PrecisionError(f"no node of the graph makes its output {old!r} (an input passed "
                         "straight out?)")
