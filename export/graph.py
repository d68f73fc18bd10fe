"""Turn a forward ONNX graph into an explainer graph (graph contract v1).

The forward graph comes from ``torch.onnx.export`` and has the input ``image`` [B,3,H,W] and
the outputs ``logits`` [B,N] plus one activation tensor [B,C,h,w] per target layer. For each
layer we cut out the *head* (every node on a path from the activations to the logits),
differentiate it with onnx-ad's reverse mode, and graft the adjoint back:

    image ─forward─► activations ─head─► logits ─TopK/Where─► classes ─OneHot─► seeds [B,N,K]
                          └────────────── head adjoint (seeds) ──────────────► gradients [B,K,C,h,w]

A head made only of batch-independent operators (pooling + fully connected layers) is
differentiated with the symbolic batch directly, and its recomputed primal nodes are
merged with the forward ones. A head with convolutions needs fully static shapes in onnx-ad,
so it is differentiated at batch 1 and run per sample inside an ONNX ``Scan`` over the
batch axis. Finally, every node whose inputs are all constant (the adjoint's weight
transposes) is folded at export time so that nothing of it runs per call.

``build_saliency`` makes the optional companion graph the same way, with the whole network
as the head (its boundary input is ``image``): outputs ``logits``, ``classes`` and
``input_gradients`` [B,K,3,H,W]. A network with convolutions goes through the Scan, so the
companion recomputes the forward pass per sample inside it.

``build_head`` makes the head companion: the same heads, cut out the same way but not
differentiated, side by side in one graph with the activations as inputs and the logits as
outputs (for methods that recompute the logits from modified activations: Ablation-CAM).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_ad import UnsupportedOperator, reverse

from camserve import contract
from camserve.errors import CamserveError

OPSET = 17
_SEED = "adj_" + contract.LOGITS  # onnx-ad's name for the seed of ``logits``


class GraphBuildError(CamserveError):
    """The forward graph cannot be turned into an explainer graph."""


@dataclass(frozen=True)
class LayerTensors:
    """A layer's activation output in the forward graph and the names it gets in v1."""

    forward_name: str
    activations: str
    gradients: str


def build_explainer(forward: onnx.ModelProto, layers: list[LayerTensors]) -> onnx.ModelProto:
    """Explainer graph from a forward graph (inputs: image; outputs: logits, activations...).

    Returns a model with inputs ``image`` [B,3,H,W], ``targets`` int64 [B,K] and outputs
    ``logits`` [B,N], ``classes`` [B,K], then per layer activations [B,C,h,w] and gradients
    [B,K,C,h,w]. Raises GraphBuildError when a head cannot be differentiated.
    """
    base = _Base.of(forward)
    graph = base.forward.graph
    for index, layer in enumerate(layers):
        head = _extract_head(base.forward, layer.forward_name)
        base.add_gradients(head, f"explain/{index}/", layer.gradients)
        if layer.activations != layer.forward_name:
            base.nodes.append(helper.make_node("Identity", [layer.forward_name],
                                               [layer.activations]))
        c, h, w = _static_dims(_value_info(graph, layer.forward_name))[1:]
        base.outputs.append(helper.make_tensor_value_info(layer.activations, TensorProto.FLOAT,
                                                          ["B", c, h, w]))
        base.outputs.append(helper.make_tensor_value_info(layer.gradients, TensorProto.FLOAT,
                                                          ["B", "K", c, h, w]))
    return base.finish("camserve_explainer")


def build_saliency(forward: onnx.ModelProto) -> onnx.ModelProto:
    """Saliency companion graph from a forward graph: the whole network is the head.

    Returns a model with inputs ``image`` [B,3,H,W], ``targets`` int64 [B,K] and outputs
    ``logits`` [B,N], ``classes`` [B,K] and ``input_gradients`` [B,K,3,H,W] =
    d logits[b, classes[b,k]] / d image[b]. A network with convolutions is differentiated at
    batch 1 and runs per sample in a Scan (which recomputes its forward pass per sample).
    """
    base = _Base.of(forward)
    head = _extract_head(base.forward, contract.IMAGE)
    base.add_gradients(head, "saliency/", contract.INPUT_GRADIENTS)
    _, c, h, w = _static_dims(_value_info(base.forward.graph, contract.IMAGE))
    base.outputs.append(helper.make_tensor_value_info(contract.INPUT_GRADIENTS,
                                                      TensorProto.FLOAT, ["B", "K", c, h, w]))
    return base.finish("camserve_saliency")


def build_head(forward: onnx.ModelProto, layers: list[LayerTensors],
               logits: list[str]) -> tuple[onnx.ModelProto | None, list[str]]:
    """Head companion graph from a forward graph: per layer, its head (activations ->
    logits) with input ``layer.activations`` [B_i,C,h,w] and output ``logits[i]`` [B_i,N].

    A layer whose head reads other tensors besides its activations (a skip connection
    crossing the cut) cannot be fed its activations alone and is left out. Returns the
    model (None when every layer was left out) and the activations names of those left out.
    """
    light, weights = _prepared(forward)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    used_weights: set[str] = set()
    left_out = []
    for index, (layer, output) in enumerate(zip(layers, logits)):
        head = _self_contained(light, _extract_head(light, layer.forward_name))
        if head.num_boundary != 1:
            left_out.append(layer.activations)
            continue
        scope = f"head/{index}/"
        body = _prefixed(head.model.graph, scope, keep=head.weights)
        rename = {scope + layer.forward_name: layer.activations, scope + contract.LOGITS: output}
        for node in body.node:
            _rename_io(node, rename)
        batch = "B" if len(layers) == 1 else f"B{index}"  # every head has a batch of its own
        for value, name in ((body.input[0], layer.activations), (body.output[0], output)):
            value.name = name
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_param = batch
            (inputs if name == layer.activations else outputs).append(value)
        nodes += body.node
        initializers += body.initializer
        used_weights |= head.weights
    if not inputs:
        return None, left_out
    # built and checked with the large weights as inputs (cheap to copy), which then become
    # initializers: for VGG's classifier that saves seconds of protobuf copies
    large = [_value_info(light.graph, name) for name in sorted(used_weights)]
    built = helper.make_graph(nodes, "camserve_head", inputs + large, outputs,
                              initializer=initializers)
    model = helper.make_model(built, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="camserve")
    model.ir_version = forward.ir_version
    model = fold_constants(model)
    onnx.checker.check_model(model)
    del model.graph.input[len(inputs):]
    reads = {i for n in model.graph.node for i in n.input} | _subgraph_reads(model.graph.node)
    model.graph.initializer.extend(w for w in weights if w.name in reads)
    return model, left_out


def _self_contained(forward: onnx.ModelProto, head: "_Head") -> "_Head":
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
    batch = _dims(activations)[0]
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
    return _Head(onnx.shape_inference.infer_shapes(model), head.activations, 1 + len(kept))


def _shape_from_batch(node: onnx.NodeProto, graph: onnx.GraphProto, activations: str,
                      batch: int | str) -> list[onnx.NodeProto] | None:
    """Nodes computing ``Shape(x)`` (``node``) from the activations' batch size when x is
    [batch,d1,...] with d1,... static; None otherwise."""
    try:
        dims = _dims(_value_info(graph, node.input[0]))
    except GraphBuildError:
        return None
    if not dims or dims[0] != batch or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    picked = list(range(len(dims)))[slice(attrs.get("start", 0), attrs.get("end"))]
    out = node.output[0]
    rest = np.array([dims[i] for i in picked if i > 0], np.int64)
    constant = helper.make_node("Constant", [], [out + "/static" if 0 in picked else out],
                                value=numpy_helper.from_array(rest))
    if 0 not in picked:
        return [constant]
    size = helper.make_node("Shape", [activations], [out + "/batch"], start=0, end=1)
    return [size, constant, helper.make_node("Concat", [out + "/batch", out + "/static"],
                                             [out], axis=0)]


def _prepared(forward: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """The forward graph with its large weights split off (as graph inputs), constants
    folded and shapes inferred; and those weights."""
    light, weights = _split_weights(forward)
    return onnx.shape_inference.infer_shapes(fold_constants(light), strict_mode=True), weights


@dataclass
class _Base:
    """What every graph built here starts from: the forward nodes and weights, the nodes
    resolving ``targets`` into ``classes`` and one-hot ``seeds``, and the outputs ``logits``
    and ``classes``; ``add_gradients`` grafts a head's adjoint, ``finish`` makes the model."""

    forward: onnx.ModelProto  # weights split off, constants folded, shapes inferred
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    outputs: list[onnx.ValueInfoProto]
    seeds: str
    scopes: list[str] = field(default_factory=list)  # name prefixes of the adjoints' nodes

    @classmethod
    def of(cls, forward: onnx.ModelProto) -> "_Base":
        forward, weights = _prepared(forward)
        graph = forward.graph
        num_classes = _static_dims(_value_info(graph, contract.LOGITS))[1]
        resolve_nodes, seeds = _resolve_targets(num_classes)
        outputs = [_value_info(graph, contract.LOGITS),
                   helper.make_tensor_value_info(contract.CLASSES, TensorProto.INT64,
                                                 ["B", "K"])]
        return cls(forward, list(graph.node) + resolve_nodes,
                   list(graph.initializer) + weights, outputs, seeds)

    def add_gradients(self, head: "_Head", scope: str, name: str) -> None:
        """Nodes computing ``name`` [B,K,...] = d logits[b, classes[b,k]] / d head input[b]:
        the head's adjoint with the symbolic batch, or per sample in a Scan when onnx-ad
        cannot differentiate it so (convolutions)."""
        try:
            nodes, inits, out = _batched_adjoint(head, self.seeds, scope)
            produced = {o for node in self.forward.graph.node for o in node.output}
            nodes = [n for n in nodes if not set(n.output) <= produced]
        except (UnsupportedOperator, ValueError):
            # a Scan slices every boundary tensor along the batch: shapes from before the
            # cut (not batch-major) are recomputed inside the head, per sample
            nodes, inits, out = _scanned_adjoint(_self_contained(self.forward, head),
                                                 self.seeds, scope)
        self.nodes += nodes
        self.initializers += inits
        self.scopes.append(scope)
        rank = len(_dims(head.model.graph.input[0]))  # adjoint [B,...,K] -> [B,K,...]
        self.nodes.append(helper.make_node("Transpose", [out], [name],
                                           perm=[0, rank] + list(range(1, rank))))

    def finish(self, graph_name: str) -> onnx.ModelProto:
        graph = self.forward.graph
        image = copy.deepcopy(next(v for v in graph.input if v.name == contract.IMAGE))
        targets = helper.make_tensor_value_info(contract.TARGETS, TensorProto.INT64, ["B", "K"])
        built = helper.make_graph(self.nodes, graph_name, [image, targets], self.outputs,
                                  initializer=self.initializers)
        model = helper.make_model(built, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="camserve")
        model.ir_version = self.forward.ir_version
        model = fold_constants(model)  # also drops nodes no output needs
        model = gather_one_hot_products(model, self.seeds)
        model = flatten_unit_inner_axis(model, scopes=tuple(self.scopes))
        model = share_equal_weights(model)
        _drop_unread_weights(model.graph)
        _allow_zero_dims(model.graph)
        onnx.checker.check_model(model)
        return model


def _split_weights(model: onnx.ModelProto, max_elements: int = 4096):
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


def _resolve_targets(num_classes: int) -> tuple[list[onnx.NodeProto], str]:
    """Nodes that resolve ``targets`` into ``classes`` and one-hot seeds [B,N,K].

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


@dataclass
class _Head:
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


def _extract_head(forward: onnx.ModelProto, activations: str) -> _Head:
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
    inputs = [_value_info(graph, name) for name in boundary + head_weights]
    head_graph = helper.make_graph(head_nodes, "head", inputs,
                                   [_value_info(graph, contract.LOGITS)], initializer=inits)
    model = helper.make_model(head_graph, opset_imports=list(forward.opset_import))
    model.ir_version = forward.ir_version
    return _Head(onnx.shape_inference.infer_shapes(model), activations, len(boundary))


def _batched_adjoint(head: _Head, seeds: str, scope: str):
    """Adjoint of the head with the symbolic batch: nodes, initializers, output [B,C,h,w,K].

    Primal node names are kept, so the caller can drop those the forward graph already has.
    """
    adjoint = reverse(head.model, inputs=[head.activations], outputs=[contract.LOGITS],
                      layout="onnx")
    renamed = _prefixed(adjoint.graph, scope, keep=_primal_names(head.model))
    nodes = [helper.make_node("Identity", [seeds], [scope + _SEED])] + list(renamed.node)
    primal_inits = {i.name for i in head.model.graph.initializer}
    inits = [i for i in renamed.initializer if i.name not in primal_inits]
    return nodes, inits, scope + "adj_" + head.activations


def _scanned_adjoint(head: _Head, seeds: str, scope: str):
    """Adjoint of a head with convolutions: batch-1 adjoint run per sample in a Scan.

    Scan inputs are the head's boundary tensors [B,...] and the seeds [B,N,K]; each step
    unsqueezes its slices to batch 1, runs the adjoint and squeezes the result back, so the
    Scan output is [B,C,h,w,K].
    """
    single = _at_batch_one(head)
    try:
        adjoint = reverse(single, inputs=[head.activations], outputs=[contract.LOGITS],
                          layout="onnx")
    except (UnsupportedOperator, ValueError) as exc:
        raise GraphBuildError(f"cannot differentiate the head after {head.activations!r}: "
                              f"{exc}") from exc
    body_scope = scope + "step/"
    body = _prefixed(adjoint.graph, body_scope, keep=head.weights)
    axes = body_scope + "axis0"
    nodes = [helper.make_node("Constant", [], [axes],
                              value=numpy_helper.from_array(np.array([0], np.int64), axes))]
    body_inputs = []
    for value in list(single.graph.input[: head.num_boundary]) + [_seed_info(adjoint)]:
        sliced = body_scope + "slice/" + value.name
        dims = _dims(value)[1:]
        body_inputs.append(helper.make_tensor_value_info(
            sliced, value.type.tensor_type.elem_type, dims))
        nodes.append(helper.make_node("Unsqueeze", [sliced, axes], [body_scope + value.name]))
    nodes += list(body.node)
    out = body_scope + "adj_" + head.activations
    step_out = body_scope + "result"
    nodes.append(helper.make_node("Squeeze", [out, axes], [step_out]))
    c, h, w = _static_dims(single.graph.input[0])[1:]
    body_graph = helper.make_graph(
        nodes, "adjoint_step", body_inputs,
        [helper.make_tensor_value_info(step_out, TensorProto.FLOAT, [c, h, w, "K"])],
        initializer=list(body.initializer))
    result = scope + "adjoint"
    scan_inputs = [value.name for value in head.boundary] + [seeds]
    scan = helper.make_node("Scan", scan_inputs, [result], body=body_graph,
                            num_scan_inputs=len(scan_inputs))
    return [scan], [], result


def _at_batch_one(head: _Head) -> onnx.ModelProto:
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
    return next(v for v in adjoint.graph.input if v.name == _SEED)


def _primal_names(model: onnx.ModelProto) -> set[str]:
    names = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    names |= {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node for o in n.output}
    return names


def _prefixed(graph: onnx.GraphProto, scope: str, keep: set[str]) -> onnx.GraphProto:
    """A copy of ``graph`` with every value name not in ``keep`` prefixed by ``scope``."""
    out = copy.deepcopy(graph)
    names = {v.name for v in out.input} | {v.name for v in out.output}
    names |= {i.name for i in out.initializer} | {o for n in out.node for o in n.output}
    mapping = {name: scope + name for name in names if name and name not in keep}
    for node in out.node:
        _rename_io(node, mapping)
        node.name = scope + node.name if node.name else ""
    for init in out.initializer:
        init.name = mapping.get(init.name, init.name)
    for value in list(out.input) + list(out.output):
        value.name = mapping.get(value.name, value.name)
    del out.value_info[:]
    return out


def _rename_io(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    for i, name in enumerate(node.input):
        if name in mapping:
            node.input[i] = mapping[name]
    for i, name in enumerate(node.output):
        if name in mapping:
            node.output[i] = mapping[name]
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            _rename_subgraph_reads(attr.g, mapping)


def _rename_subgraph_reads(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        _rename_io(node, mapping)


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
    kept = _live(kept, {o.name for o in graph.output})
    reads = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    reads |= _subgraph_reads(kept)
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
        kept = _live(nodes, {o.name for o in graph.output})
        del graph.node[:]
        graph.node.extend(kept)
    return model


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
            _rename_io(node, rename)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def _allow_zero_dims(graph: onnx.GraphProto,
                     outer: dict[str, onnx.TensorProto] | None = None) -> None:
    """``allowzero=1`` on every Reshape (and in Scan bodies) whose shape is computed, so that
    an empty dimension stays empty: the graph then also runs with K = 0 targets (logits
    only, the adjoint on empty tensors). With the default, a 0 in a computed shape means
    "copy the input's dimension", which fails on an empty seed axis. A Reshape whose shape is
    a constant holding a 0 keeps the default: there the 0 was meant as "copy"."""
    constants = {**(outer or {}), **{init.name: init for init in graph.initializer}}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _allow_zero_dims(attr.g, constants)
        if node.op_type != "Reshape" or any(a.name == "allowzero" for a in node.attribute):
            continue
        shape = constants.get(node.input[1])
        if shape is not None and 0 in numpy_helper.to_array(shape).tolist():
            continue
        node.attribute.append(helper.make_attribute("allowzero", 1))


def _drop_unread_weights(graph: onnx.GraphProto) -> None:
    reads = {i for n in graph.node for i in n.input} | _subgraph_reads(graph.node)
    reads |= {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in reads]
    del graph.initializer[:]
    graph.initializer.extend(kept)


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


_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")


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
    light, _ = _split_weights(model)
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

    def adjoint(node: onnx.NodeProto) -> bool:
        return any(o.startswith(scopes) for o in node.output) and bool(scopes)

    nodes: list[onnx.NodeProto] = []
    flat = "camserve/flat_shape"
    used_flat = False
    for node in model.graph.node:
        out = node.output[0] if node.output else ""
        if adjoint(node) and node.op_type in _ELEMENTWISE and len(node.input) == 2:
            a, b = node.input
            scalar = [ranks.get(a) == 0, ranks.get(b) == 0]
            if scalar.count(True) == 1:
                x = b if scalar[0] else a
                if ranks.get(x, 0) >= 2:
                    flat_x, flat_out = out + "/flat_in", out + "/flat"
                    operands = [a, flat_x] if scalar[0] else [flat_x, b]
                    nodes += [helper.make_node("Shape", [x], [out + "/shape"]),
                              helper.make_node("Reshape", [x, flat], [flat_x]),
                              helper.make_node(node.op_type, operands, [flat_out]),
                              helper.make_node("Reshape", [flat_out, out + "/shape"], [out])]
                    used_flat = True
                    continue
        if adjoint(node) and node.op_type == "Where":
            mask, yes, no = node.input
            if is_zero(no) or is_zero(yes):
                kept = yes if is_zero(no) else no
                if is_zero(yes):
                    nodes.append(helper.make_node("Not", [mask], [out + "/not"]))
                    mask = out + "/not"
                nodes += [helper.make_node("CastLike", [mask, kept], [out + "/mask"]),
                          helper.make_node("Mul", [kept, out + "/mask"], [out])]
                continue
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if used_flat:
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), flat))
    return model


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in order. onnx-ad also emits the weights' gradients,
    which nothing reads; left in a Scan body, onnxruntime would compute them at every step."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if needed & set(node.output):
            live.append(node)
            needed.update(node.input)
            needed |= _subgraph_reads([node])
    return live[::-1]


def _subgraph_reads(nodes) -> set[str]:
    reads: set[str] = set()
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                reads |= {i for n in attr.g.node for i in n.input}
                reads |= _subgraph_reads(attr.g.node)
    return reads


def _value_info(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == name:
            return copy.deepcopy(value)
    raise GraphBuildError(f"no shape is known for tensor {name!r}")


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def _static_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return _dims(value)
