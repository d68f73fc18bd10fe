"""The export's graph rewrite passes and the shared walkers of ``camserve.onnxgraph``, on
tiny hand-built ONNX graphs: each pass keeps the outputs (checked with onnx's reference
evaluator) and changes the nodes it should. No torch, no export; runs in seconds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from camserve import contract
from camserve.export import rewrites
from camserve.export.common import rename_io, subgraph_reads
from camserve.onnxgraph import (
    accepts_no_targets,
    iter_graphs,
    iter_nodes,
    stored_tensors,
)

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _value(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _tensor(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [node.op_type for node in graph.node]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _scan_adding(weight: str, scope: str = "body/") -> onnx.NodeProto:
    """``Scan`` over x [B,3] whose body adds ``Neg(weight)`` (an outer tensor) to each row."""
    body = helper.make_graph(
        [helper.make_node("Neg", [weight], [scope + "neg"]),
         helper.make_node("Add", [scope + "row", scope + "neg"], [scope + "out"])],
        "body", [_value(scope + "row", FLOAT, [3])], [_value(scope + "out", FLOAT, [3])])
    return helper.make_node("Scan", ["x"], ["y"], body=body, num_scan_inputs=1)


# camserve.onnxgraph ------------------------------------------------------------------------

def _nested() -> onnx.GraphProto:
    """A graph holding a Scan whose body holds an If (two branches), and a node of a custom
    domain with a GRAPHS attribute (two graphs); tensors stored at every level."""
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=_tensor("t_value", [1.0]))],
        "then", [], [_value("t", FLOAT, [1])])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["e_init"], ["e"])], "else", [],
        [_value("e", FLOAT, [1])], initializer=[_tensor("e_init", [2.0])])
    body = helper.make_graph(
        [helper.make_node("If", ["cond"], ["picked"], then_branch=then_branch,
                          else_branch=else_branch, name="if"),
         helper.make_node("Add", ["row", "picked"], ["out"], name="add")],
        "body", [_value("row", FLOAT, [1])], [_value("out", FLOAT, [1])],
        initializer=[_tensor("body_init", [3.0])])
    first = helper.make_graph([helper.make_node("Identity", ["x"], ["g1"], name="g1")], "first",
                              [], [_value("g1", FLOAT, [1])])
    second = helper.make_graph([], "second", [], [], initializer=[_tensor("g2_init", [4.0])])
    return helper.make_graph(
        [helper.make_node("Scan", ["x"], ["y"], body=body, num_scan_inputs=1, name="scan"),
         helper.make_node("Custom", [], [], domain="test", bodies=[first, second],
                          name="custom")],
        "main", [_value("x", FLOAT, [2, 1]), _value("cond", BOOL, [])],
        [_value("y", FLOAT, [2, 1])], initializer=[_tensor("main_init", [5.0])])


def test_iter_graphs_reaches_graph_and_graphs_attributes_at_any_depth():
    names = [graph.name for graph in iter_graphs(_nested())]
    assert names[0] == "main"
    assert sorted(names) == ["body", "else", "first", "main", "second", "then"]


def test_iter_nodes_yields_every_node_of_every_subgraph():
    ops = sorted(node.op_type for node in iter_nodes(_nested()))
    assert ops == ["Add", "Constant", "Custom", "Identity", "Identity", "If", "Scan"]


def test_stored_tensors_are_initializers_and_constants_everywhere():
    names = sorted(tensor.name for tensor in stored_tensors(_nested()))
    assert names == ["body_init", "e_init", "g2_init", "main_init", "t_value"]


# the K = 0 invariant: rewrites.allow_zero_dims writes it, onnxgraph.accepts_no_targets reads

def _transposed_reshape(in_scan: bool) -> onnx.ModelProto:
    """x [2,K] reshaped to the shape of its transpose [K,2] (computed: Shape of a tensor),
    either in the main graph or in a Scan body (over a leading axis of x [1,2,K]); plus a
    Reshape to a constant shape holding a 0 ("copy that dimension")."""
    compute = [helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
               helper.make_node("Shape", ["at"], ["shape"]),
               helper.make_node("Reshape", ["a", "shape"], ["b"]),
               helper.make_node("Reshape", ["b", "copy_shape"], ["c"])]
    copy_shape = _tensor("copy_shape", np.array([0, 2], np.int64))
    if not in_scan:
        nodes = [helper.make_node("Identity", ["x"], ["a"])] + compute
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
        return _model(nodes, [_value("x", FLOAT, [2, "K"])], [_value("y", FLOAT, ["K", 2])],
                      [copy_shape])
    body = helper.make_graph(compute, "body", [_value("a", FLOAT, [2, "K"])],
                             [_value("c", FLOAT, ["K", 2])])
    scan = helper.make_node("Scan", ["x"], ["y"], body=body, num_scan_inputs=1)
    return _model([scan], [_value("x", FLOAT, [1, 2, "K"])], [_value("y", FLOAT, [1, "K", 2])],
                  [copy_shape])


@pytest.mark.parametrize("in_scan", [False, True])
def test_allow_zero_dims_writes_what_accepts_no_targets_reads(in_scan):
    model = _transposed_reshape(in_scan)
    assert not accepts_no_targets(model.graph)  # an older export: K = 0 is not safe
    rewrites.allow_zero_dims(model.graph)
    assert accepts_no_targets(model.graph)
    reshapes = [node for node in iter_nodes(model.graph) if node.op_type == "Reshape"]
    allowzero = [[helper.get_attribute_value(a) for a in node.attribute
                  if a.name == "allowzero"] for node in reshapes]
    assert allowzero == [[1], []]  # the constant shape's 0 keeps meaning "copy"


def test_allow_zero_dims_keeps_an_empty_axis_empty():
    model = _transposed_reshape(in_scan=False)
    x = np.zeros((2, 0), np.float32)
    with pytest.raises(Exception):  # noqa: B017 -- 0 copies x's first axis: 4 != 0 elements
        _run(model, {"x": x})
    rewrites.allow_zero_dims(model.graph)
    (y,) = _run(model, {"x": x})
    assert y.shape == (0, 2)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], x.reshape(3, 2))


def test_allow_zero_dims_leaves_a_set_allowzero_alone():
    model = _transposed_reshape(in_scan=False)
    model.graph.node[3].attribute.append(helper.make_attribute("allowzero", 0))
    rewrites.allow_zero_dims(model.graph)
    assert not accepts_no_targets(model.graph)


# fold_constants ----------------------------------------------------------------------------

def test_fold_constants_evaluates_weight_transposes_once():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = _model(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["y"]),
         helper.make_node("Relu", ["x"], ["unused"])],
        [_value("x", FLOAT, ["B", 3])], [_value("y", FLOAT, ["B", 2])],
        [_tensor("w", w), _tensor("never_read", np.ones(2, np.float32))])
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    expected = _run(model, {"x": x})
    rewrites.fold_constants(model)
    assert _ops(model.graph) == ["MatMul"]  # the dead Relu went too
    assert [init.name for init in model.graph.initializer] == ["wt"]
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w.T)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], expected[0])


def test_fold_constants_folds_a_scan_body_with_the_outer_weights():
    model = _model([_scan_adding("w")], [_value("x", FLOAT, [2, 3])],
                   [_value("y", FLOAT, [2, 3])], [_tensor("w", np.array([1, 2, 3], np.float32))])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = _run(model, {"x": x})
    rewrites.fold_constants(model)
    body = model.graph.node[0].attribute[0].g
    assert _ops(body) == ["Add"]
    assert [init.name for init in body.initializer] == ["body/neg"]
    assert [init.name for init in model.graph.initializer] == []  # only the Neg read it
    np.testing.assert_array_equal(_run(model, {"x": x})[0], expected[0])


def test_fold_constants_keeps_random_nodes():
    model = _model([helper.make_node("RandomNormal", [], ["r"], shape=[2]),
                    helper.make_node("Add", ["x", "r"], ["y"])],
                   [_value("x", FLOAT, [2])], [_value("y", FLOAT, [2])])
    rewrites.fold_constants(model)
    assert _ops(model.graph) == ["RandomNormal", "Add"]


# gather_one_hot_products -------------------------------------------------------------------

# The [B,K,N] case: the pass builds the Gather but only writes its node list back when the
# node count changed, which only the [K,B,N] layout (an extra Transpose of ``classes``) does;
# onnx-ad's Gemm adjoint, the case in every network tested, is [K,B,N].
_BKN_NOT_WRITTEN = pytest.mark.xfail(strict=True, reason="rewrite of the [B,K,N] layout is "
                                     "dropped (same node count)")


@pytest.mark.parametrize("perm,out_shape", [
    pytest.param([0, 2, 1], ["B", "K", 3], marks=_BKN_NOT_WRITTEN),
    ([2, 0, 1], ["K", "B", 3])])
def test_gather_one_hot_products_replaces_the_seed_matmul(perm, out_shape):
    """One-hot seeds [B,N,K] of ``classes``, moved to [B,K,N] (or onnx-ad's [K,B,N]), times
    W [N,C] are W's rows of those classes."""
    n = 5
    w = np.random.default_rng(1).standard_normal((n, 3)).astype(np.float32)
    model = _model(
        [helper.make_node("OneHot", [contract.CLASSES, "depth", "values"], ["seeds"], axis=1),
         helper.make_node("Identity", ["seeds"], ["seeds_copy"]),
         helper.make_node("Transpose", ["seeds_copy"], ["moved"], perm=perm),
         helper.make_node("MatMul", ["moved", "w"], ["y"])],
        [_value(contract.CLASSES, INT64, ["B", "K"])], [_value("y", FLOAT, out_shape)],
        [_tensor("depth", np.array(n, np.int64)),  # (the reference OneHot wants a scalar)
         _tensor("values", np.array([0, 1], np.float32)), _tensor("w", w)])
    classes = np.array([[4, 0], [2, 2], [1, 3]], np.int64)
    expected = _run(model, {contract.CLASSES: classes})[0]
    rewrites.gather_one_hot_products(model, "seeds")
    assert "MatMul" not in _ops(model.graph) and "OneHot" not in _ops(model.graph)
    assert _ops(model.graph)[-1] == "Gather"
    np.testing.assert_allclose(_run(model, {contract.CLASSES: classes})[0], expected,
                               rtol=1e-6)


def test_gather_one_hot_products_leaves_other_matmuls():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [_value("x", FLOAT, [2, 5])], [_value("y", FLOAT, [2, 3])],
                   [_tensor("w", np.ones((5, 3), np.float32))])
    before = model.SerializeToString()
    rewrites.gather_one_hot_products(model, "seeds")
    assert model.SerializeToString() == before


# flatten_unit_inner_axis -------------------------------------------------------------------

def _adjoint_like() -> onnx.ModelProto:
    """Element-wise nodes on x [2,3,1] (a trailing seed axis of 1): three in the adjoint's
    scope ``adj/``, one outside it."""
    return _model(
        [helper.make_node("Div", ["x", "s"], ["adj/div"]),
         helper.make_node("Where", ["mask", "adj/div", "zero"], ["adj/relu"]),
         helper.make_node("Where", ["mask", "zero", "adj/relu"], ["adj/flipped"]),
         helper.make_node("Mul", ["adj/flipped", "s"], ["outside"])],
        [_value("x", FLOAT, [2, 3, 1]), _value("s", FLOAT, []),
         _value("mask", BOOL, [2, 3, 1])],
        [_value("outside", FLOAT, [2, 3, 1]), _value("adj/relu", FLOAT, [2, 3, 1])],
        [_tensor("zero", np.array(0, np.float32))])


def test_flatten_unit_inner_axis_rewrites_only_the_adjoint_and_keeps_the_values():
    model = _adjoint_like()
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 3, 1)).astype(np.float32),
             "s": np.array(3.0, np.float32), "mask": rng.random((2, 3, 1)) > 0.5}
    expected = _run(model, feeds)
    rewrites.flatten_unit_inner_axis(model, scopes=("adj/",))
    assert _ops(model.graph) == ["Shape", "Reshape", "Div", "Reshape",  # x / s, flat
                                 "CastLike", "Mul",  # Where(mask, x, 0)
                                 "Not", "CastLike", "Mul",  # Where(mask, 0, x)
                                 "Mul"]  # outside the scope: as it was
    assert "camserve/flat_shape" in {init.name for init in model.graph.initializer}
    onnx.checker.check_model(model, full_check=True)
    for got, want in zip(_run(model, feeds), expected):
        np.testing.assert_array_equal(got, want)


def test_flatten_unit_inner_axis_without_scopes_changes_nothing():
    model = _adjoint_like()
    before = model.SerializeToString()
    rewrites.flatten_unit_inner_axis(model, scopes=())
    assert model.SerializeToString() == before


# share_equal_weights, drop_unread_weights, live --------------------------------------------

def test_share_equal_weights_keeps_one_copy_of_large_equal_weights():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = _model([helper.make_node("MatMul", ["x", "w1"], ["a"]),
                    helper.make_node("MatMul", ["x", "w2"], ["b"]),
                    helper.make_node("MatMul", ["x", "small2"], ["c"])],
                   [_value("x", FLOAT, [2, 3])],
                   [_value(name, FLOAT, [2, 4]) for name in "abc"],
                   [_tensor("w1", w), _tensor("w2", w.copy()), _tensor("small1", w[:, :1]),
                    _tensor("small2", w[:, :1].copy())])
    model.graph.output[2].type.tensor_type.shape.dim[1].dim_value = 1
    x = np.ones((2, 3), np.float32)
    expected = _run(model, {"x": x})
    rewrites.share_equal_weights(model, min_elements=12)
    assert [init.name for init in model.graph.initializer] == ["w1", "small1", "small2"]
    assert [node.input[1] for node in model.graph.node] == ["w1", "w1", "small2"]
    for got, want in zip(_run(model, {"x": x}), expected):
        np.testing.assert_array_equal(got, want)


def test_drop_unread_weights_keeps_what_a_scan_body_reads():
    model = _model([_scan_adding("w")], [_value("x", FLOAT, [2, 3])],
                   [_value("y", FLOAT, [2, 3])],
                   [_tensor("w", np.ones(3, np.float32)), _tensor("spare", np.ones(1))])
    rewrites.drop_unread_weights(model.graph)
    assert [init.name for init in model.graph.initializer] == ["w"]


def test_live_keeps_what_the_outputs_need_in_order():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Neg", ["x"], ["dead"]),
             _scan_adding("a"),
             helper.make_node("Abs", ["dead"], ["dead2"])]
    assert [n.op_type for n in rewrites.live(nodes, {"y"})] == ["Relu", "Scan"]


# helpers shared with the builders ----------------------------------------------------------

def test_subgraph_reads_and_rename_io_reach_into_bodies():
    scan = _scan_adding("w")
    assert subgraph_reads([scan]) == {"w", "body/row", "body/neg"}
    rename_io(scan, {"w": "w_shared", "x": "x2"})
    assert list(scan.input) == ["x2"]
    assert "w_shared" in subgraph_reads([scan]) and "w" not in subgraph_reads([scan])
