"""float16 export (``export_explainer(..., precision="float16")``, ``camserve export
--precision float16``): float16 weights inside, the float32 contract outside, accepted by the
server, and Grad-CAM maps that agree with the float32 export.

The tolerances are for onnxruntime's CPU provider, which runs most float16 nodes in float32
between casts it inserts: what differs here is the rounding of weights and of the tensors
between nodes to float16 (relative step 2^-11 = 4.9e-4). A normalised map is then off by a
few of those steps plus what flips at a threshold: a MaxPool window whose two largest values
round to the same float16, a ReLU input near 0. On the two sample photos the tiny network's
maps differ by at most 1.0e-3 (one layer) and 3.5e-3 (two layers, the first through
MaxPool's adjoint), correlation >= 0.999997; we allow 2e-2 (about 5 of a heatmap's 256
colour steps, and what the pretrained EfficientNet-Lite0 stays within: 1.1e-2, see
bench/precision.py) and ask for a correlation of 0.999.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT, SAMPLES

from camserve import contract
from camserve.contract import ContractError, ModelCard
from camserve.explain import methods
from camserve.explain.image import decode, preprocess
from camserve.export import ExportError, export_explainer
from camserve.export import precision as fp16
from camserve.server.runtime import load_models

MAP_TOLERANCE = 2e-2
MAP_CORRELATION = 0.999
LABELS = [f"thing {i}" for i in range(10)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """The tiny network exported both ways, one layer (with the saliency companion) and two
    layers (a head with a convolution: its adjoint runs in a Scan)."""
    folders = {}
    for precision in contract.PRECISIONS:
        folder = tmp_path_factory.mktemp(precision)
        export_explainer(tiny_model, folder / "tiny.onnx", input_size=64, labels=LABELS,
                         architecture="tinynet", input_gradients=True, precision=precision)
        export_explainer(tiny_model, folder / "tiny2.onnx", input_size=64, labels=LABELS,
                         target_layers=["features.2", "features.6"], architecture="tinynet",
                         precision=precision)
        folders[precision] = folder
    return folders


def _files(folder):
    return sorted(path.name for path in folder.glob("*.onnx"))


def _float_initializers(model: onnx.ModelProto) -> dict[int, int]:
    """Number of float32 / float16 values stored as initializers, subgraphs included."""
    counts = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            if tensor.data_type in counts:
                counts[tensor.data_type] += int(np.prod(tensor.dims))
        graphs += [a.g for n in graph.node for a in n.attribute
                   if a.type == onnx.AttributeProto.GRAPH]
    return counts


def _interface(model: onnx.ModelProto) -> list[tuple]:
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*model.graph.input, *model.graph.output]]


def test_every_file_holds_float16_weights_behind_the_float32_contract(exported):
    assert _files(exported["float16"]) == _files(exported["float32"]) == [
        "tiny.head.onnx", "tiny.onnx", "tiny.saliency.onnx", "tiny2.head.onnx", "tiny2.onnx"]
    for name in _files(exported["float16"]):
        half = onnx.load(str(exported["float16"] / name))
        full = onnx.load(str(exported["float32"] / name))
        onnx.checker.check_model(half, full_check=True)
        weights = _float_initializers(half)
        assert weights[onnx.TensorProto.FLOAT] == 0, name
        assert weights[onnx.TensorProto.FLOAT16] == _float_initializers(full)[
            onnx.TensorProto.FLOAT], name
        # float32 constants left: only the scalars that undo the gradient scaling
        assert fp16.stored_types(half) <= {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT,
                                           onnx.TensorProto.INT64}
        assert _interface(half) == _interface(full), name
        props = {p.key: p.value for p in half.metadata_props}
        assert json.loads(props[contract.KEY_PRECISION]) == "float16"
        assert ModelCard.from_metadata(props).precision == "float16"


def test_the_server_loads_them_with_their_companions(exported):
    models = load_models(exported["float16"], device="cpu", threads=1)
    assert sorted(models) == ["tiny", "tiny2"]
    assert models["tiny"].saliency is not None and models["tiny"].head_layers == ("features",)
    assert models["tiny2"].head_layers == ("features.2", "features.6")
    assert {m.card.precision for m in models.values()} == {"float16"}
    assert all(m.provider == "CPUExecutionProvider" for m in models.values())


def _photos():
    return [decode((SAMPLES / name).read_bytes()) for name in ("cat.jpg",
                                                                          "coffee.jpg")]


@pytest.fixture(scope="module")
def loaded(exported):
    return {precision: load_models(folder, device="cpu", threads=1)
            for precision, folder in exported.items()}


@pytest.mark.parametrize("name", ["tiny", "tiny2"])
def test_gradcam_maps_agree_with_float32(loaded, name):
    full, half = loaded["float32"][name], loaded["float16"][name]
    layers = [layer.name for layer in full.card.layers]
    targets = np.array([[-1, -2, 3, 7]], np.int64)
    for photo in _photos():
        image, _ = preprocess(photo, full.card.preprocessing)
        logits32, classes32, per32 = full.run(image, targets, layers)
        logits16, classes16, per16 = half.run(image, targets, layers)
        assert logits16.dtype == np.float32 and classes16.dtype == np.int64
        np.testing.assert_allclose(logits16, logits32, atol=5e-3 * np.abs(logits32).max())
        assert np.array_equal(classes16, classes32)  # (the tiny net's logits are far apart)
        maps32 = methods.cam_maps("gradcam", [(a[0], g[0]) for a, g in per32.values()], (64, 64))
        maps16 = methods.cam_maps("gradcam", [(a[0], g[0]) for a, g in per16.values()], (64, 64))
        assert maps16.dtype == np.float32
        assert np.abs(maps16 - maps32).max() < MAP_TOLERANCE
        for m16, m32 in zip(maps16, maps32):
            if m32.std() > 0:  # (a target whose map is all zero after the ReLU has none)
                assert np.corrcoef(m16.ravel(), m32.ravel())[0, 1] > MAP_CORRELATION


def test_companions_agree_with_float32(loaded):
    """Input gradients pass MaxPool's adjoint, which routes each window's gradient to its
    largest input: where two inputs round to the same float16 it picks another pixel, so
    single pixels differ by up to half the largest gradient (about 2% of the pixels by more
    than 2% of it), while the whole agrees: correlations 0.989 to 0.997 on the samples
    (which inputs land near such ties moves with the preprocessing); we ask 0.98. A wrong
    float16 adjoint decorrelates completely."""
    full, half = loaded["float32"]["tiny"], loaded["float16"]["tiny"]
    targets = np.array([[-1, 4]], np.int64)
    for photo in _photos():
        image, _ = preprocess(photo, full.card.preprocessing)
        _, _, grads32 = full.input_gradients(image, targets)
        _, _, grads16 = half.input_gradients(image, targets)
        assert grads16.dtype == np.float32 and grads16.shape == grads32.shape
        for g16, g32 in zip(grads16[0], grads32[0]):
            assert np.corrcoef(g16.ravel(), g32.ravel())[0, 1] > 0.98
    image, _ = preprocess(_photos()[0], full.card.preprocessing)
    activations = full.run(image, targets, ["features"])[2]["features"][0]
    logits32 = full.head_logits("features", activations)
    np.testing.assert_allclose(half.head_logits("features", activations), logits32,
                               atol=5e-3 * np.abs(logits32).max())


def test_gradient_scaling_keeps_small_gradients_exact(tiny_model, tmp_path, loaded):
    """The last layer's gradients (fc weights / 1024 pixels, mostly below float16's
    smallest normal number) are within 0.1% of float32 at the 99th percentile, which the
    unscaled adjoint misses (2% there)."""
    full, half = loaded["float32"]["tiny"], loaded["float16"]["tiny"]
    image = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    targets = np.array([[-1, 3], [0, -2]], np.int64)
    g32 = full.run(image, targets, ["features"])[2]["features"][1]
    g16 = half.run(image, targets, ["features"])[2]["features"][1]
    nonzero = g32 != 0
    assert (np.abs(g32[nonzero]) < 6.1e-5).mean() > 0.2  # subnormal in float16
    relative = np.abs(g16 - g32)[nonzero] / np.abs(g32[nonzero])
    assert np.quantile(relative, 0.99) < 1e-3


def test_cli_exports_float16(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "camserve", "export", "--arch", "squeezenet1_1",
         "--input-size", "64", "--precision", "float16", "--name", "sq", "--out",
         str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "float16" in done.stdout
    model = onnx.load(str(tmp_path / "sq.onnx"))
    assert _float_initializers(model)[onnx.TensorProto.FLOAT] == 0
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    assert card.precision == "float16"
    assert load_models(tmp_path, device="cpu", threads=1)["sq"].card.precision == "float16"


def test_unknown_precision_is_refused(tmp_path, tiny_model):
    with pytest.raises(ExportError, match="unknown precision 'bfloat16'"):
        export_explainer(tiny_model, tmp_path / "t.onnx", input_size=64, precision="bfloat16")
    assert not list(tmp_path.iterdir())


def test_precision_metadata_is_optional_and_checked(exported):
    model = onnx.load(str(exported["float32"] / "tiny.onnx"), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert ModelCard.from_metadata(props).precision == "float32"
    del props[contract.KEY_PRECISION]  # a file exported before the key existed
    assert ModelCard.from_metadata(props).precision == "float32"
    props[contract.KEY_PRECISION] = json.dumps("int4")
    with pytest.raises(ContractError, match="precision 'int4' is not supported"):
        ModelCard.from_metadata(props)
