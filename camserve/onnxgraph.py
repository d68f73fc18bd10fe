"""Walks over ONNX graphs, shared by the export (which writes graphs) and the server (which
reads them): subgraphs, nodes, stored tensors, and the K = 0 targets check.

Part of the core: imports onnx only (no torch, onnxruntime, grpc or component).

A subgraph is a node attribute of type GRAPH (a ``Scan``'s body, an ``If``'s branches) or
GRAPHS; its nodes may read the enclosing graphs' values by name.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it, at any depth (``graph`` first, then depth-first)."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs_of(node):
            yield from iter_graphs(sub)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs, at any depth."""
    for sub in iter_graphs(graph):
        yield from sub.node


def stored_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers and tensor attributes (``Constant``
    values), subgraphs included. What a model file's weights are, wherever they sit."""
    for sub in iter_graphs(graph):
        yield from sub.initializer
        for node in sub.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t


def accepts_no_targets(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> bool:
    """Whether the explainer graph runs with K = 0 targets: every Reshape computing its shape
    keeps empty dimensions (``allowzero=1``). Reshapes with a constant shape (an initializer
    of this graph or of an enclosing one, ``outer``) are fine either way.

    The reader of an invariant whose writer is ``camserve.export.rewrites.allow_zero_dims``
    (run on every graph ``camserve export`` writes); files from older exports lack it.
    """
    constants = outer | {init.name for init in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH and not accepts_no_targets(attr.g,
                                                                                 constants):
                return False
        if node.op_type == "Reshape" and node.input[1] not in constants and not any(
                a.name == "allowzero" and a.i == 1 for a in node.attribute):
            return False
    return True


def _subgraphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The subgraphs held directly by ``node``'s attributes."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        yield from attribute.graphs
