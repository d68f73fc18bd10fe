"""The class-gradients of a head: its reverse-mode adjoint (onnx-ad), fed one-hot seeds.

``resolve_targets`` turns ``targets`` [B,K] into ``classes`` [B,K] and the seeds [B,N,K]
(seed[b,:,k] is one-hot at classes[b,k]). Then, for a head from ``head.extract_head``:

* ``batched_adjoint`` differentiates it with the symbolic batch (pooling + fully connected
  layers: batch-independent operators);
* ``scanned_adjoint`` differentiates it at batch 1 and runs that per sample inside an ONNX
  ``Scan`` over the batch axis (convolutions: onnx-ad needs their shapes fully static, and a
  batch-1 adjoint relabelled to a symbolic batch is wrong for B > 1).

Both return nodes computing the adjoint [B,C,h,w,K] (onnx-ad's layout: the seed axis last).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_ad import UnsupportedOperator, reverse

from camserve import contract
from camserve.export.common import GraphBuildError, dims, prefixed
from camserve.export.head import Head

SEED = "adj_" + contract.LOGITS  # onnx-ad's name for the seed of ``logits``

Adjoint = tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]  # nodes, weights, output


def resolve_targets(num_classes: int) -> tuple[list[onnx.NodeProto], str]:
    """Nodes that resolve ``targets`` into ``classes`` and one-hot seeds [B,N,K]; and the
    seeds' name.

    A negative target -r picks the r-th highest logit; indices are clipped into [0, N) so the
    graph is defined for any input (the server validates ranges before running it).
    """
    n = num_classes
    const = {
        "resolve/n": np.array([n], np.int64),
        "resolve/zero": np.array(0, np.int64),
        "resolve/one": np.array(1, np.int64),
        "resolve/last": np.array(n - 1, np.int64),
        "resolve/depth": np.array([n], np.int64),
        "resolve/onehot_values": np.array([0.0, 1.0], np.float32),
    }
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))
             for name, v in const.items()]
    nodes += [
        helper.make_node("TopK", [contract.LOGITS, "resolve/n"],
                         ["resolve/sorted_logits", "resolve/ranking"], axis=1),
        helper.make_node("Neg", [contract.TARGETS], ["resolve/neg"]),
        helper.make_node("Sub", ["resolve/neg", "resolve/one"], ["resolve/rank"]),
        helper.make_node("Clip", ["resolve/rank", "resolve/zero", "resolve/last"],
                         ["resolve/rank_clipped"]),
        helper.make_node("GatherElements", ["resolve/ranking", "resolve/rank_clipped"],
                         ["resolve/ranked"], axis=1),
        helper.make_node("Clip", [contract.TARGETS, "resolve/zero", "resolve/last"],
                         ["resolve/explicit"]),
        helper.make_node("GreaterOrEqual", [contract.TARGETS, "resolve/zero"],
                         ["resolve/is_class"]),
        helper.make_node("Where", ["resolve/is_class", "resolve/explicit", "resolve/ranked"],
                         [contract.CLASSES]),
        # OneHot along axis 1: classes [B,K] -> seeds [B,N,K]
        helper.make_node("OneHot", [contract.CLASSES, "resolve/depth", "resolve/onehot_values"],
                         ["resolve/seeds"], axis=1),
    ]
    return nodes, "resolve/seeds"


def batched_adjoint(head: Head, seeds: str, scope: str) -> Adjoint:
    """Adjoint of the head with the symbolic batch: nodes, initializers, output [B,C,h,w,K].

    Primal node names are kept, so the caller can drop those the forward graph already has.
    Raises onnx-ad's UnsupportedOperator or ValueError when it needs static shapes.
    """
    adjoint = reverse(head.model, inputs=[head.activations], outputs=[contract.LOGITS],
                      layout="onnx")
    renamed = prefixed(adjoint.graph, scope, keep=_primal_names(head.model))
    nodes = [helper.make_node("Identity", [seeds], [scope + SEED])] + list(renamed.node)
    primal_inits = {i.name for i in head.model.graph.initializer}
    inits = [i for i in renamed.initializer if i.name not in primal_inits]
    return nodes, inits, scope + "adj_" + head.activations


def scanned_adjoint(head: Head, seeds: str, scope: str) -> Adjoint:
    """Adjoint of a head with convolutions: batch-1 adjoint run per sample in a Scan.

    Scan inputs are the head's boundary tensors [B,...] and the seeds [B,N,K]; each step
    unsqueezes its slices to batch 1, runs the adjoint and squeezes the result back, so the
    Scan output is [B,C,h,w,K]. Outer and body value names differ (ONNX is SSA): the body's
    are prefixed ``scope + "step/"``. Raises GraphBuildError when onnx-ad cannot
    differentiate the head even at batch 1.
    """
    single = _at_batch_one(head)
    try:
        adjoint = reverse(single, inputs=[head.activations], outputs=[contract.LOGITS],
                          layout="onnx")
    except (UnsupportedOperator, ValueError) as exc:
        raise GraphBuildError(f"cannot differentiate the head after {head.activations!r}: "
                              f"{exc}") from exc
    body_scope = scope + "step/"
    body = prefixed(adjoint.graph, body_scope, keep=head.weights)
    axes = body_scope + "axis0"
    nodes = [helper.make_node("Constant", [], [axes],
                              value=numpy_helper.from_array(np.array([0], np.int64), axes))]
    body_inputs = []
    for value in list(single.graph.input[: head.num_boundary]) + [_seed_info(adjoint)]:
        sliced = body_scope + "slice/" + value.name
        body_inputs.append(helper.make_tensor_value_info(
            sliced, value.type.tensor_type.elem_type, dims(value)[1:]))
        nodes.append(helper.make_node("Unsqueeze", [sliced, axes], [body_scope + value.name]))
    nodes += list(body.node)
    out = body_scope + "adj_" + head.activations
    step_out = body_scope + "result"
    nodes.append(helper.make_node("Squeeze", [out, axes], [step_out]))
    c, h, w = dims(single.graph.input[0])[1:]
    body_graph = helper.make_graph(
        nodes, "adjoint_step", body_inputs,
        [helper.make_tensor_value_info(step_out, TensorProto.FLOAT, [c, h, w, "K"])],
        initializer=list(body.initializer))
    result = scope + "adjoint"
    scan_inputs = [value.name for value in head.boundary] + [seeds]
    scan = helper.make_node("Scan", scan_inputs, [result], body=body_graph,
                            num_scan_inputs=len(scan_inputs))
    return [scan], [], result


def _at_batch_one(head: Head) -> onnx.ModelProto:
    """The head with its batch fixed to 1 and shapes re-inferred (what onnx-ad's Conv needs)."""
    single = copy.deepcopy(head.model)
    for value in single.graph.input[: head.num_boundary]:
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    del single.graph.value_info[:]
    single.graph.output[0].type.tensor_type.shape.dim[0].Clear()
    single.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    return onnx.shape_inference.infer_shapes(single, data_prop=True)


def _seed_info(adjoint: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The declared type and shape of the seed input onnx-ad added ([1,N,K] at batch 1)."""
    return next(v for v in adjoint.graph.input if v.name == SEED)


def _primal_names(model: onnx.ModelProto) -> set[str]:
    """Every value name of ``model`` (inputs, outputs, weights, node outputs)."""
    names = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    names |= {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node for o in n.output}
    return names
