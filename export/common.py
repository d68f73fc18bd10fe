"""What the graph-building modules (head, adjoint, rewrites, graph) share: the operator set,
their error, value shapes, renaming values, the reads of subgraphs, and the large weights
split off a model while it is analysed."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from camserve.errors import OperatorError
from camserve.onnxgraph import iter_nodes

OPSET = 17  # of the forward export and of every graph built from it


class GraphBuildError(OperatorError):
    """The forward graph cannot be turned into an explainer graph."""


def value_info(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    """A copy of the declared or inferred type and shape of ``name`` in ``graph``."""
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == name:
            return copy.deepcopy(value)
    raise GraphBuildError(f"no shape is known for tensor {name!r}")


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """The shape of ``value``: ints where static, names where symbolic, ``"?"`` if unknown."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def subgraph_reads(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """The names read by the nodes inside ``nodes``' subgraphs (at any depth): a Scan body
    may read a tensor of the enclosing graph that no node input names."""
    return {name for node in nodes for attr in node.attribute
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)
            for inner in iter_nodes(sub) for name in inner.input}


def rename_io(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    """Rename ``node``'s inputs and outputs found in ``mapping``, and what its subgraphs'
    nodes read or write under those names."""
    for i, name in enumerate(node.input):
        if name in mapping:
            node.input[i] = mapping[name]
    for i, name in enumerate(node.output):
        if name in mapping:
            node.output[i] = mapping[name]
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            for inner in attr.g.node:
                rename_io(inner, mapping)


def prefixed(graph: onnx.GraphProto, scope: str, keep: set[str]) -> onnx.GraphProto:
    """A copy of ``graph`` with every value name not in ``keep`` prefixed by ``scope`` (and
    its value_info dropped), so that it can be merged into another graph without clashes."""
    out = copy.deepcopy(graph)
    names = {v.name for v in out.input} | {v.name for v in out.output}
    names |= {i.name for i in out.initializer} | {o for n in out.node for o in n.output}
    mapping = {name: scope + name for name in names if name and name not in keep}
    for node in out.node:
        rename_io(node, mapping)
        node.name = scope + node.name if node.name else ""
    for init in out.initializer:
        init.name = mapping.get(init.name, init.name)
    for value in list(out.input) + list(out.output):
        value.name = mapping.get(value.name, value.name)
    del out.value_info[:]
    return out


def split_weights(model: onnx.ModelProto, max_elements: int = 4096
                  ) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of ``model`` whose large initializers are graph inputs, and those initializers.

    Shape inference and onnx-ad serialise the model many times; without the weights that
    takes milliseconds instead of minutes for VGG-sized classifiers. The weights stay
    constants for the differentiation (they are never differentiated inputs).
    """
    light = onnx.ModelProto()
    light.CopyFrom(model)
    weights = [init for init in model.graph.initializer if int(np.prod(init.dims)) > max_elements]
    names = {w.name for w in weights}
    small = [init for init in light.graph.initializer if init.name not in names]
    del light.graph.initializer[:]
    light.graph.initializer.extend(small)
    light.graph.input.extend(
        helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)) for w in weights)
    return light, weights
