"""Rewrite passes over a built graph: each takes a model (or graph) and leaves it computing
the same outputs, cheaper to run or valid for more inputs.

``graph.py`` runs them in this order on every explainer and saliency graph:

* ``fold_constants`` -- every node whose inputs are all constants is evaluated once;
* ``gather_one_hot_products`` -- one-hot seeds times a weight matrix become a Gather;
* ``flatten_unit_inner_axis`` -- element-wise adjoint nodes avoid a trailing axis of 1;
* ``share_equal_weights`` -- one copy of a weight stored twice;
* ``drop_unread_weights`` -- initializers nothing reads go;
* ``allow_zero_dims`` -- computed Reshapes keep empty dimensions (K = 0 targets).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from camserve import contract
from camserve.export.common import OPSET, rename_io, split_weights, subgraph_reads

_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate, once, every node whose inputs are all constants; store results as weights.

    This is what keeps the adjoint's ``Transpose(W)`` of fully connected weights from
    running at every call. Control-flow bodies are folded too, with the enclosing graphs'
    weights as constants. Nodes nothing reads and unused weights are dropped.
    """
    _fold_graph(model.graph, model.opset_import)
    return model


def _fold_graph(graph: onnx.GraphProto, opsets,
                outer: dict[str, onnx.TensorProto] | None = None) -> None:
    """Fold ``graph``; ``outer`` are the enclosing graphs' weights a body may read."""
    from onnx.reference import ReferenceEvaluator

    defined = {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    initializers = {name: init for name, init in (outer or {}).items() if name not in defined}
    initializers.update((init.name, init) for init in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _fold_graph(attr.g, opsets, initializers)
    folded: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        return folded[name] if name in folded else numpy_helper.to_array(initializers[name])

    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        has_subgraph = any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)
        inputs = [name for name in node.input if name]
        if (node.op_type.startswith("Random") or has_subgraph or node.domain not in ("", "ai.onnx")
                or not all(name in initializers or name in folded for name in inputs)):
            kept.append(node)
            continue
        single = helper.make_node(node.op_type, list(node.input), list(node.output),
                                  **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        results = ReferenceEvaluator(single, opsets=OPSET).run(
            None, {name: value(name) for name in inputs})
        for name, result in zip(node.output, results):
            folded[name] = np.asarray(result)
    kept = live(kept, {o.name for o in graph.output})
    reads = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    reads |= subgraph_reads(kept)
    new_inits = [init for init in graph.initializer if init.name in reads]
    new_inits += [numpy_helper.from_array(folded[name], name) for name in folded if name in reads]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)


def gather_one_hot_products(model: onnx.ModelProto, seeds: str) -> onnx.ModelProto:
    """Replace ``MatMul(one-hot seeds [B,K,N], W [N,C])`` by ``Gather(W, classes)`` [B,K,C]
    (likewise in the [K,B,N] layout onnx-ad uses for a Gemm's adjoint).

    The adjoint of a fully connected layer multiplies its seeds by the weight matrix; our
    seeds are one-hot rows of ``classes``, so the product is exactly W's rows of those
    classes (a MatMul of 1.3-2 M multiply-adds per target becomes a copy of K rows). Matched
    only where the MatMul reads ``seeds`` [B,N,K] through Identity, Transpose and Expand to
    the logits' own shape (onnx-ad's seed plumbing), ending in the [B,K,N] layout.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    weights = {init.name: init for init in graph.initializer}

    def seed_layout(name: str) -> tuple[str, ...] | None:
        """The axes of ``name`` if it is the seeds moved around, else None."""
        if name == seeds:
            return ("B", "N", "K")
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            return seed_layout(node.input[0])
        if node.op_type == "Transpose":
            layout = seed_layout(node.input[0])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return None if layout is None or perm is None else tuple(layout[i] for i in perm)
        if node.op_type == "Expand" and _expands_to_logits_shape(node.input[1], producers,
                                                                 weights):
            return seed_layout(node.input[0])
        return None

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        layout = seed_layout(node.input[0]) if node.op_type == "MatMul" else None
        if (layout not in (("B", "K", "N"), ("K", "B", "N")) or node.input[1] not in weights
                or len(weights[node.input[1]].dims) != 2):
            nodes.append(node)
            continue
        rows = contract.CLASSES  # [B,K]; onnx-ad's [K,B,N] layout wants them [K,B]
        if layout[0] == "K":
            rows = node.output[0] + "/classes_kb"
            nodes.append(helper.make_node("Transpose", [contract.CLASSES], [rows], perm=[1, 0]))
        nodes.append(helper.make_node("Gather", [node.input[1], rows], list(node.output), axis=0))
    if len(nodes) != len(graph.node):
        kept = live(nodes, {o.name for o in graph.output})
        del graph.node[:]
        graph.node.extend(kept)
    return model


def _expands_to_logits_shape(shape: str, producers: dict[str, onnx.NodeProto],
                             weights: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``shape`` is ``Concat(Shape(logits), [1])``: expanding seeds [B,N,K] to it
    changes nothing."""
    concat = producers.get(shape)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return False
    source, ones = producers.get(concat.input[0]), weights.get(concat.input[1])
    return (source is not None and source.op_type == "Shape" and not source.attribute
            and source.input[0] == contract.LOGITS and ones is not None
            and numpy_helper.to_array(ones).tolist() == [1])


def flatten_unit_inner_axis(model: onnx.ModelProto, scopes: tuple[str, ...]) -> onnx.ModelProto:
    """Rewrite two element-wise patterns of the adjoint nodes (outputs named ``scope...``)
    that onnxruntime's CPU kernels run 20-40x slower than they should.

    onnx-ad lays an adjoint out as [B,C,h,w,K] (the seed axis last), and K is 1 for one
    target. onnxruntime's element-wise kernels walk the innermost axis as their unit of work,
    so an innermost axis of 1 costs a call per element: on EfficientNet-Lite0's [1,1280,7,7,1]
    adjoint, ``Div`` by a scalar took 1.9 ms and ``Where`` 2.3 ms (the same data flat: 0.05
    ms). So:

    * ``x <op> s`` with ``s`` a scalar (Add/Sub/Mul/Div, either side) runs on
      ``Reshape(x, [-1])`` and is reshaped back to ``Shape(x)``;
    * ``Where(mask, x, 0)`` (a ReLU/Clip adjoint) becomes ``x * CastLike(mask, x)``
      (and ``Where(mask, 0, x)`` becomes ``x * CastLike(Not(mask), x)``), which onnxruntime runs on
      equal shapes without broadcasting when K = 1, and 5x faster than Where when K > 1.
      Equal for finite x (an adjoint of finite logits is finite).
    """
    light, _ = split_weights(model)
    inferred = onnx.shape_inference.infer_shapes(light).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             [*inferred.value_info, *inferred.input, *inferred.output]
             if v.type.tensor_type.HasField("shape")}
    constants = {init.name: init for init in model.graph.initializer}

    def is_zero(name: str) -> bool:
        init = constants.get(name)
        if init is None or int(np.prod(init.dims)) != 1:
            return False
        return float(numpy_helper.to_array(init).reshape(-1)[0]) == 0.0

    nodes: list[onnx.NodeProto] = []
    flat = "camserve/flat_shape"
    used_flat = False
    for node in model.graph.node:
        adjoint = bool(scopes) and any(o.startswith(scopes) for o in node.output)
        rewritten = None
        if adjoint and node.op_type in _ELEMENTWISE and len(node.input) == 2:
            rewritten = _flat_scalar_op(node, ranks, flat)
            used_flat = used_flat or rewritten is not None
        elif adjoint and node.op_type == "Where":
            rewritten = _where_as_mul(node, is_zero)
        nodes += [node] if rewritten is None else rewritten
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if used_flat:
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), flat))
    return model


def _flat_scalar_op(node: onnx.NodeProto, ranks: dict[str, int],
                    flat: str) -> list[onnx.NodeProto] | None:
    """``x <op> s`` (``s`` of rank 0, either side; x of rank >= 2) run on x flattened by
    the shape ``flat`` ([-1]) and reshaped back; None for any other ``node``."""
    a, b = node.input
    scalar = [ranks.get(a) == 0, ranks.get(b) == 0]
    if scalar.count(True) != 1:
        return None
    x = b if scalar[0] else a
    if ranks.get(x, 0) < 2:
        return None
    out = node.output[0]
    flat_x, flat_out = out + "/flat_in", out + "/flat"
    operands = [a, flat_x] if scalar[0] else [flat_x, b]
    return [helper.make_node("Shape", [x], [out + "/shape"]),
            helper.make_node("Reshape", [x, flat], [flat_x]),
            helper.make_node(node.op_type, operands, [flat_out]),
            helper.make_node("Reshape", [flat_out, out + "/shape"], [out])]


def _where_as_mul(node: onnx.NodeProto,
                  is_zero: Callable[[str], bool]) -> list[onnx.NodeProto] | None:
    """``Where(mask, x, 0)`` as ``x * CastLike(mask, x)`` (``Where(mask, 0, x)`` with
    ``Not(mask)``); None when neither branch is a constant 0."""
    mask, yes, no = node.input
    if not (is_zero(no) or is_zero(yes)):
        return None
    out = node.output[0]
    kept = yes if is_zero(no) else no
    nodes = []
    if is_zero(yes):
        nodes.append(helper.make_node("Not", [mask], [out + "/not"]))
        mask = out + "/not"
    return nodes + [helper.make_node("CastLike", [mask, kept], [out + "/mask"]),
                    helper.make_node("Mul", [kept, out + "/mask"], [out])]


def share_equal_weights(model: onnx.ModelProto, min_elements: int = 4096) -> onnx.ModelProto:
    """Keep one copy of large weights that are stored twice with equal contents (a fully
    connected weight matrix read by the forward Gemm and, after folding, by its adjoint)."""
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept = []
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) >= min_elements:
            key = (init.data_type, tuple(init.dims), hashlib.sha256(
                numpy_helper.to_array(init).tobytes()).hexdigest())
            if key in first:
                rename[init.name] = first[key]
                continue
            first[key] = init.name
        kept.append(init)
    if rename:
        for node in model.graph.node:
            rename_io(node, rename)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def drop_unread_weights(graph: onnx.GraphProto) -> None:
    """Remove the initializers that no node (subgraphs included) and no output reads."""
    reads = {i for n in graph.node for i in n.input} | subgraph_reads(graph.node)
    reads |= {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in reads]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def allow_zero_dims(graph: onnx.GraphProto,
                    outer: dict[str, onnx.TensorProto] | None = None) -> None:
    """``allowzero=1`` on every Reshape (and in Scan bodies) whose shape is computed, so that
    an empty dimension stays empty: the graph then also runs with K = 0 targets (logits
    only, the adjoint on empty tensors). With the default, a 0 in a computed shape means
    "copy the input's dimension", which fails on an empty seed axis. A Reshape whose shape is
    a constant holding a 0 keeps the default: there the 0 was meant as "copy".

    The writer of the invariant that ``camserve.onnxgraph.accepts_no_targets`` reads when
    the server loads a file (a Reshape with a constant shape passes it either way); change
    the two together.
    """
    constants = {**(outer or {}), **{init.name: init for init in graph.initializer}}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                allow_zero_dims(attr.g, constants)
        if node.op_type != "Reshape" or any(a.name == "allowzero" for a in node.attribute):
            continue
        shape = constants.get(node.input[1])
        if shape is not None and 0 in numpy_helper.to_array(shape).tolist():
            continue
        node.attribute.append(helper.make_attribute("allowzero", 1))


def live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in order. onnx-ad also emits the weights' gradients,
    which nothing reads; left in a Scan body, onnxruntime would compute them at every step."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if needed & set(node.output):
            kept.append(node)
            needed.update(node.input)
            needed |= subgraph_reads([node])
    return kept[::-1]
