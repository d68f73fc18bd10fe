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

This module only assembles; the layers below it: ``head`` cuts the heads out, ``adjoint``
resolves the targets into seeds and differentiates the heads, ``rewrites`` makes the
assembled graph cheap to run (and valid with K = 0 targets), ``common`` holds what they
share.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper
from onnx_ad import UnsupportedOperator

from camserve import contract
from camserve.export import rewrites
from camserve.export.adjoint import batched_adjoint, resolve_targets, scanned_adjoint
from camserve.export.common import (
    OPSET,
    dims,
    prefixed,
    rename_io,
    split_weights,
    subgraph_reads,
    value_info,
)
from camserve.export.head import Head, extract_head, self_contained


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
        head = extract_head(base.forward, layer.forward_name)
        base.add_gradients(head, f"explain/{index}/", layer.gradients)
        if layer.activations != layer.forward_name:
            base.nodes.append(helper.make_node("Identity", [layer.forward_name],
                                               [layer.activations]))
        c, h, w = dims(value_info(graph, layer.forward_name))[1:]
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
    head = extract_head(base.forward, contract.IMAGE)
    base.add_gradients(head, "saliency/", contract.INPUT_GRADIENTS)
    _, c, h, w = dims(value_info(base.forward.graph, contract.IMAGE))
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
        head = self_contained(light, extract_head(light, layer.forward_name))
        if head.num_boundary != 1:
            left_out.append(layer.activations)
            continue
        scope = f"head/{index}/"
        body = prefixed(head.model.graph, scope, keep=head.weights)
        rename = {scope + layer.forward_name: layer.activations, scope + contract.LOGITS: output}
        for node in body.node:
            rename_io(node, rename)
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
    large = [value_info(light.graph, name) for name in sorted(used_weights)]
    built = helper.make_graph(nodes, "camserve_head", inputs + large, outputs,
                              initializer=initializers)
    model = helper.make_model(built, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="camserve")
    model.ir_version = forward.ir_version
    model = rewrites.fold_constants(model)
    onnx.checker.check_model(model)
    del model.graph.input[len(inputs):]
    reads = {i for n in model.graph.node for i in n.input} | subgraph_reads(model.graph.node)
    model.graph.initializer.extend(w for w in weights if w.name in reads)
    return model, left_out


def _prepared(forward: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """The forward graph with its large weights split off (as graph inputs), constants
    folded and shapes inferred; and those weights."""
    light, weights = split_weights(forward)
    return (onnx.shape_inference.infer_shapes(rewrites.fold_constants(light), strict_mode=True),
            weights)


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
    def of(cls, forward: onnx.ModelProto) -> _Base:
        forward, weights = _prepared(forward)
        graph = forward.graph
        num_classes = dims(value_info(graph, contract.LOGITS))[1]
        resolve_nodes, seeds = resolve_targets(num_classes)
        outputs = [value_info(graph, contract.LOGITS),
                   helper.make_tensor_value_info(contract.CLASSES, TensorProto.INT64,
                                                 ["B", "K"])]
        return cls(forward, list(graph.node) + resolve_nodes,
                   list(graph.initializer) + weights, outputs, seeds)

    def add_gradients(self, head: Head, scope: str, name: str) -> None:
        """Nodes computing ``name`` [B,K,...] = d logits[b, classes[b,k]] / d head input[b]:
        the head's adjoint with the symbolic batch, or per sample in a Scan when onnx-ad
        cannot differentiate it so (convolutions)."""
        try:
            nodes, inits, out = batched_adjoint(head, self.seeds, scope)
            produced = {o for node in self.forward.graph.node for o in node.output}
            nodes = [n for n in nodes if not set(n.output) <= produced]
        except (UnsupportedOperator, ValueError):
            # a Scan slices every boundary tensor along the batch: shapes from before the
            # cut (not batch-major) are recomputed inside the head, per sample
            nodes, inits, out = scanned_adjoint(self_contained(self.forward, head),
                                                self.seeds, scope)
        self.nodes += nodes
        self.initializers += inits
        self.scopes.append(scope)
        rank = len(dims(head.model.graph.input[0]))  # adjoint [B,...,K] -> [B,K,...]
        self.nodes.append(helper.make_node("Transpose", [out], [name],
                                           perm=[0, rank] + list(range(1, rank))))

    def finish(self, graph_name: str) -> onnx.ModelProto:
        """The model: inputs ``image`` and ``targets``, the outputs gathered so far, and
        the rewrite passes run on it (see ``rewrites``)."""
        graph = self.forward.graph
        image = copy.deepcopy(next(v for v in graph.input if v.name == contract.IMAGE))
        targets = helper.make_tensor_value_info(contract.TARGETS, TensorProto.INT64, ["B", "K"])
        built = helper.make_graph(self.nodes, graph_name, [image, targets], self.outputs,
                                  initializer=self.initializers)
        model = helper.make_model(built, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="camserve")
        model.ir_version = self.forward.ir_version
        model = rewrites.fold_constants(model)  # also drops nodes no output needs
        model = rewrites.gather_one_hot_products(model, self.seeds)
        model = rewrites.flatten_unit_inner_axis(model, scopes=tuple(self.scopes))
        model = rewrites.share_equal_weights(model)
        rewrites.drop_unread_weights(model.graph)
        rewrites.allow_zero_dims(model.graph)  # read back by onnxgraph.accepts_no_targets
        onnx.checker.check_model(model)
        return model
