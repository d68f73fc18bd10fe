"""The *head* of a layer: every node of the forward graph on a path from the layer's
activations [B,C,h,w] to the logits [B,N], cut out as a standalone model.

``extract_head`` cuts it; its inputs are the activations, then whatever else it reads from
before the cut (a skip connection, or a shape computed from the image), then the large
weights. ``self_contained`` recomputes inside the head what is computed from the shapes
alone, so that only tensors carrying values remain on its boundary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from camserve import contract
from camserve.export.common import GraphBuildError, dims, value_info


@dataclass
class Head:
    """The activations -> logits part of the forward graph, as a standalone model.

    ``model`` inputs: the activations first, then every other tensor the head reads from
    the rest of the network (a skip connection crossing the cut), then the large weights
    (kept outside while differentiating); output: ``logits``.
    """

    model: onnx.ModelProto
    activations: str
    num_boundary: int  # the first inputs are tensors [B,...]; the rest are weights

    @property
    def boundary(self) -> list[onnx.ValueInfoProto]:
        return list(self.model.graph.input[: self.num_boundary])

    @property
    def weights(self) -> set[str]:
        return {v.name for v in self.model.graph.input[self.num_boundary:]}


def extract_head(forward: onnx.ModelProto, activations: str) -> Head:
    """The head of ``activations`` in ``forward`` (whose large weights are graph inputs),
    with shapes inferred. Raises GraphBuildError when the logits do not depend on the
    activations."""
    graph = forward.graph
    weights = [v.name for v in graph.input if v.name != contract.IMAGE]
    constants = {init.name for init in graph.initializer} | set(weights)
    constant_nodes = []
    for node in graph.node:  # e.g. Identity nodes the exporter adds for shared weights
        if all(i in constants for i in node.input if i):
            constant_nodes.append(node)
            constants.update(node.output)

    # nodes downstream of the activations
    downstream: set[str] = {activations}
    below: list[onnx.NodeProto] = []
    for node in graph.node:
        if any(i in downstream for i in node.input):
            below.append(node)
            downstream.update(node.output)
    if contract.LOGITS not in downstream:
        raise GraphBuildError(f"the logits do not depend on the activations {activations!r}")
    # ... that the logits need
    needed = {contract.LOGITS}
    head_nodes = []
    for node in reversed(below):
        if any(o in needed for o in node.output):
            head_nodes.append(node)
            needed.update(node.input)
    head_nodes.reverse()
    head_nodes = [n for n in constant_nodes if set(n.output) & needed] + head_nodes
    head_outputs = {o for n in head_nodes for o in n.output}
    used = {i for n in head_nodes for i in n.input if i}
    boundary = [activations] + sorted(
        name for name in used - head_outputs - constants - {activations})
    head_weights = [name for name in weights if name in used]
    inits = [init for init in graph.initializer if init.name in used]
    inputs = [value_info(graph, name) for name in boundary + head_weights]
    head_graph = helper.make_graph(head_nodes, "head", inputs,
                                   [value_info(graph, contract.LOGITS)], initializer=inits)
    model = helper.make_model(head_graph, opset_imports=list(forward.opset_import))
    model.ir_version = forward.ir_version
    return Head(onnx.shape_inference.infer_shapes(model), activations, len(boundary))


def self_contained(forward: onnx.ModelProto, head: Head) -> Head:
    """``head`` with every boundary tensor that is computed from nothing but the shapes of
    tensors before the cut recomputed inside it; what remains on its boundary besides the
    activations carries values from before the cut (a skip connection).

    Such a tensor comes from e.g. ``x.view(inputs.size(0), -1)`` (a Shape of the image,
    Gather, Concat). Each ``Shape`` of a tensor [B,d1,...] with static d1,... and the
    activations' batch B becomes the activations' batch size and the constants d1,....
    """
    if head.num_boundary == 1:
        return head
    graph = forward.graph
    producers = {o: n for n in graph.node for o in n.output}
    constants = {init.name for init in graph.initializer}
    activations = head.model.graph.input[0]
    batch = dims(activations)[0]
    cone: list[onnx.NodeProto] = []  # the nodes computing the recomputed tensors, in order
    seen: set[str] = set()

    def recompute(name: str) -> bool:
        if name in constants or name in seen:
            return True
        node = producers.get(name)
        if node is None or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            return False
        if node.op_type == "Shape":
            replaced = _shape_from_batch(node, graph, activations.name, batch)
            if replaced is None:
                return False
            cone.extend(replaced)
        elif all(recompute(i) for i in node.input if i):
            cone.append(node)
        else:
            return False
        seen.update(node.output)
        return True

    kept = []
    for value in head.boundary[1:]:
        before, known = len(cone), set(seen)
        if not recompute(value.name):
            del cone[before:]
            seen.intersection_update(known)
            kept.append(value.name)
    if len(kept) == head.num_boundary - 1:
        return head
    model = copy.deepcopy(head.model)
    inputs = list(model.graph.input)
    del model.graph.input[:]
    model.graph.input.extend([inputs[0]] + [v for v in inputs[1:] if v.name in kept
                                            or v.name in head.weights])
    nodes = cone + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    reads = {i for n in cone for i in n.input}
    model.graph.initializer.extend(i for i in graph.initializer if i.name in reads)
    return Head(onnx.shape_inference.infer_shapes(model), head.activations, 1 + len(kept))


def _shape_from_batch(node: onnx.NodeProto, graph: onnx.GraphProto, activations: str,
                      batch: int | str) -> list[onnx.NodeProto] | None:
    """Nodes computing ``Shape(x)`` (``node``) from the activations' batch size when x is
    [batch,d1,...] with d1,... static; None otherwise."""
    try:
        shape = dims(value_info(graph, node.input[0]))
    except GraphBuildError:
        return None
    if not shape or shape[0] != batch or not all(isinstance(d, int) and d > 0
                                                 for d in shape[1:]):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    picked = list(range(len(shape)))[slice(attrs.get("start", 0), attrs.get("end"))]
    out = node.output[0]
    rest = np.array([shape[i] for i in picked if i > 0], np.int64)
    constant = helper.make_node("Constant", [], [out + "/static" if 0 in picked else out],
                                value=numpy_helper.from_array(rest))
    if 0 not in picked:
        return [constant]
    size = helper.make_node("Shape", [activations], [out + "/batch"], start=0, end=1)
    return [size, constant, helper.make_node("Concat", [out + "/batch", out + "/static"],
                                             [out], axis=0)]
