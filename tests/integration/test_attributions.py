"""Input-space attributions: the saliency companion graph against torch.autograd, its file
and its loading, the NumPy methods of ``camserve.explain.attributions``, and the CLI flag.

The companion is exported for TinyNet (64x64) and a random resnet18 (96x96); every graph
runs in onnxruntime on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradcheck
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from camserve import contract
from camserve.cli import main as camserve_main
from camserve.contract import ModelCard
from camserve.errors import CamserveError
from camserve.explain import attributions, methods
from camserve.export import ExportError, export_explainer
from camserve.export.models import load
from camserve.server.runtime import MissingCompanionError, load_model, load_models

TARGET_CASES = {
    "B1K1": [[-1]],
    "B1K2": [[-1, 3]],
    "B3K1": [[-1], [5], [-2]],
    "B3K2": [[-1, 7], [0, -2], [-1, -1]],
}


@dataclass
class Exported:
    module: torch.nn.Module
    path: Path  # the main file; the companion is contract.companion_path(path)
    size: int

    @property
    def companion(self) -> Path:
        return contract.companion_path(self.path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model) -> Exported:
    folder = tmp_path_factory.mktemp("tiny")
    result = export_explainer(tiny_model, folder / "tiny.onnx", input_size=64,
                              architecture="tinynet", input_gradients=True)
    assert result.companion == folder / "tiny.saliency.onnx"
    return Exported(tiny_model, result.path, 64)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory) -> Exported:
    torch.manual_seed(0)
    module = load("resnet18").module
    folder = tmp_path_factory.mktemp("resnet18")
    result = export_explainer(module, folder / "r18.onnx", input_size=96,
                              architecture="resnet18", input_gradients=True)
    return Exported(module, result.path, 96)


@pytest.fixture(scope="module")
def tiny_model_loaded(tiny):
    """The TinyNet explainer with its companion, as the server loads it."""
    return load_models(tiny.path.parent, device="cpu", threads=1)["tiny"]


def _images(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _input_gradients(model: torch.nn.Module, images: np.ndarray,
                     classes: np.ndarray | None, targets=None):
    """float64 autograd: logits [B,N], classes [B,K] (resolved from ``targets`` when None)
    and d logits[b, class] / d image[b] [B,K,3,H,W]; per k one backward of the sum over
    the batch (in eval mode the samples do not interact)."""
    x = torch.from_numpy(np.asarray(images, np.float64)).requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
    if classes is None:
        classes = gradcheck.resolve_classes(logits.detach().numpy(), targets)
    rows = torch.arange(len(images))
    grads = np.stack([torch.autograd.grad(logits[rows, torch.from_numpy(classes[:, k])].sum(),
                                          x, retain_graph=True)[0].numpy()
                      for k in range(classes.shape[1])], axis=1)
    return logits.detach().numpy(), classes, grads


def _reference(module: torch.nn.Module, images: np.ndarray, targets):
    """float64 torch.autograd: logits, resolved classes, and d logits[b, class] / d image[b]
    as a ``gradcheck.Reference`` (its kink spread from the images' neighbours, on demand)."""
    model = gradcheck.float64(module)
    logits, classes, grads = _input_gradients(model, images, None, targets)
    reference = gradcheck.Reference(grads, lambda: [
        _input_gradients(model, near, classes)[2] for near in gradcheck.neighbours(images)])
    return logits, classes, reference


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(np.abs(expected).max())
    assert scale > 0
    return float(np.abs(actual - expected).max()) / scale


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)


# --- 1. the companion's gradients against torch.autograd ------------------------------------

@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_input_gradients_match_torch_autograd(request, name):
    exported: Exported = request.getfixturevalue(name)
    session = ort.InferenceSession(str(exported.companion), providers=["CPUExecutionProvider"])
    for seed, (case, targets) in enumerate(TARGET_CASES.items()):
        images = _images(len(targets), exported.size, seed)
        logits, classes, grads = session.run(
            None, {contract.IMAGE: images, contract.TARGETS: np.asarray(targets, np.int64)})
        ref_logits, ref_classes, reference = _reference(exported.module, images, targets)
        np.testing.assert_array_equal(classes, ref_classes, err_msg=case)
        assert _relative_error(logits, ref_logits) <= 1e-4, case
        verdict = gradcheck.assert_gradients_close(grads, reference, f"{name} {case}")
        print(f"{name} {case}: {verdict}")


def _with_one_adjoint_channel_off(path: Path) -> bytes:
    """The companion at ``path`` with a wrong adjoint: in the Scan body, the ConvTranspose
    that back-propagates through ``layer2.0.conv2`` (the 6th from the output side, inside
    a residual block) reads a copy of the weight with one output channel scaled by 1.01;
    the forward Conv still reads the original."""
    model = onnx.load(str(path))
    (scan,) = [n for n in model.graph.node if n.op_type == "Scan"]
    body = scan.attribute[0].g
    transposed = [n for n in body.node if n.op_type == "ConvTranspose"]
    assert len(transposed) == 20  # resnet18: 17 convolutions + 3 downsample, last first
    node = transposed[5]
    weights = {i.name: i for i in [*model.graph.initializer, *body.initializer]}
    weight = onnx.numpy_helper.to_array(weights[node.input[1]]).copy()
    weight[0] *= 1.01
    body.initializer.append(onnx.numpy_helper.from_array(weight, "corrupt/weight"))
    node.input[1] = "corrupt/weight"
    return model.SerializeToString()


def test_gradient_check_passes_a_kink_and_fails_a_wrong_adjoint(resnet18):
    """resnet18 at the B1K1 input above has a unit at its kink (gradcheck's docstring):
    a correct gradient from the other side of it (float64 autograd 3e-6 away, as float32
    on another CPU lands) fails the old 1e-4 element-wise check and passes gradcheck's;
    onnxruntime's gradient with one output channel of one adjoint convolution off by 1 %
    fails it."""
    images = _images(1, 96, 0)
    _, classes, reference = _reference(resnet18.module, images, TARGET_CASES["B1K1"])
    nudged = images + 3e-6 * np.random.default_rng(1).standard_normal(images.shape)
    _, _, kinked = _input_gradients(gradcheck.float64(resnet18.module), nudged, classes)
    verdict = gradcheck.assert_gradients_close(kinked, reference, "the other side")
    assert verdict.plain > 50 * gradcheck.TOLERANCE, verdict  # the case is a kinked one
    print(f"kinked but correct: {verdict}")

    wrong = ort.InferenceSession(_with_one_adjoint_channel_off(resnet18.companion),
                                 providers=["CPUExecutionProvider"])
    _, wrong_classes, grads = wrong.run(None, {contract.IMAGE: images,
                                               contract.TARGETS: np.array([[-1]], np.int64)})
    np.testing.assert_array_equal(wrong_classes, classes)
    verdict = gradcheck.compare(grads, reference, lazy=False)
    print(f"wrong adjoint: {verdict}")
    with pytest.raises(AssertionError, match="beyond the kink spread"):
        gradcheck.assert_gradients_close(grads, reference, "wrong adjoint")


# --- 2. the file ----------------------------------------------------------------------------

def test_companion_file_is_default_domain_onnx_describing_itself(resnet18):
    model = onnx.load(str(resnet18.companion))
    onnx.checker.check_model(model, full_check=True)
    assert all(op.domain in ("", "ai.onnx") for op in model.opset_import)
    assert all(n.domain in ("", "ai.onnx") for n in _nodes(model.graph))
    assert "Scan" in [n.op_type for n in model.graph.node]  # convolutions: per sample
    weights = {init.name for init in model.graph.initializer}
    assert not [list(n.input) for n in _nodes(model.graph)  # folded at export, even in the Scan
                if n.op_type == "Transpose" and any(i in weights for i in n.input)]

    assert [i.name for i in model.graph.input] == [contract.IMAGE, contract.TARGETS]
    assert [o.name for o in model.graph.output] == [
        contract.LOGITS, contract.CLASSES, contract.INPUT_GRADIENTS]
    grads = model.graph.output[2].type.tensor_type
    assert grads.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in grads.shape.dim] == ["B", "K", 3, 96, 96]

    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props[contract.KEY_COMPANION]) == {"model": "r18", "kind": "saliency"}
    main = onnx.load(str(resnet18.path), load_external_data=False)
    main_props = {p.key: p.value for p in main.metadata_props}
    assert contract.KEY_COMPANION not in main_props
    assert ModelCard.from_metadata(props) == ModelCard.from_metadata(main_props)


def test_export_writes_both_files_or_neither(tmp_path, tiny_model):
    (tmp_path / "t.saliency.onnx").mkdir()  # the companion's write fails after the main one
    with pytest.raises(ExportError, match="cannot write .*t.saliency.onnx"):
        export_explainer(tiny_model, tmp_path / "t.onnx", input_size=64, input_gradients=True)
    assert sorted(os.listdir(tmp_path)) == ["t.saliency.onnx"]  # no t.onnx, no .partial
    (tmp_path / "t.saliency.onnx").rmdir()

    export_explainer(tiny_model, tmp_path / "t.onnx", input_size=64, input_gradients=True)
    assert sorted(os.listdir(tmp_path)) == ["t.head.onnx", "t.onnx", "t.saliency.onnx"]
    result = export_explainer(tiny_model, tmp_path / "t.onnx", input_size=64)
    assert result.companion is None
    assert sorted(os.listdir(tmp_path)) == ["t.head.onnx", "t.onnx"]  # a stale one is removed


# --- 3. loading: one model, the companion attached ------------------------------------------

def test_load_models_attaches_the_companion(tiny, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="camserve.server"):
        models = load_models(tiny.path.parent, device="cpu")
    assert list(models) == ["tiny"]
    model = models["tiny"]
    assert model.saliency is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    images = _images(2, 64, 7)
    logits, classes, grads = model.input_gradients(images, np.array([[-1], [4]], np.int64))
    assert logits.shape == (2, 10) and classes[1, 0] == 4
    assert grads.shape == (2, 1, 3, 64, 64)
    _, _, reference = _reference(tiny.module, images, [[-1], [4]])
    gradcheck.assert_gradients_close(grads, reference)
    same_logits, same = model.gradients_of(images, np.array([classes[0, 0], 4]))
    assert same.shape == (2, 2, 3, 64, 64)
    np.testing.assert_allclose(same[1, 1], grads[1, 0], rtol=1e-5, atol=1e-7)

    with pytest.raises(CamserveError, match="companion of model 'tiny'"):
        load_model(tiny.companion, device="cpu")


def test_companion_without_its_model_or_not_matching_it_is_ignored(tiny, tmp_path, caplog):
    shutil.copy(tiny.path, tmp_path / "other.onnx")
    shutil.copy(tiny.companion, tmp_path / "tiny.saliency.onnx")  # its tiny.onnx is absent
    with caplog.at_level(logging.ERROR, logger="camserve.server"):
        models = load_models(tmp_path, device="cpu")
    assert list(models) == ["other"] and models["other"].saliency is None
    assert "ignoring tiny.saliency.onnx" in caplog.text

    with pytest.raises(MissingCompanionError, match="exported without --input-gradients"):
        models["other"].input_gradients(_images(1, 64, 0), np.array([[-1]], np.int64))

    caplog.clear()
    (tmp_path / "tiny.saliency.onnx").rename(tmp_path / "other.saliency.onnx")
    model = load_models(tmp_path, device="cpu")["other"]
    assert model.saliency is not None  # found by its file name; its metadata says "tiny"
    changed = onnx.load(str(tiny.companion))
    for prop in changed.metadata_props:
        if prop.key == contract.KEY_LABELS:
            prop.value = json.dumps([f"another {i}" for i in range(10)])
    onnx.save(changed, str(tmp_path / "other.saliency.onnx"))
    with caplog.at_level(logging.ERROR, logger="camserve.server"):
        models = load_models(tmp_path, device="cpu")
    assert list(models) == ["other"] and models["other"].saliency is None
    assert "ignoring other.saliency.onnx" in caplog.text and "differs" in caplog.text


# --- 4. the NumPy methods ---------------------------------------------------------------------

class Counting:
    """gradients_of that counts its calls and remembers the batch sizes."""

    def __init__(self, model) -> None:
        self.model = model
        self.batches: list[int] = []

    def __call__(self, batch: np.ndarray, classes: np.ndarray):
        self.batches.append(len(batch))
        return self.model.gradients_of(batch, classes)


def test_integrated_gradients_completeness(tiny, tiny_model_loaded):
    """sum of attributions = logit(x) - logit(x') within 2 %, the logits from torch."""
    model = tiny_model_loaded
    black = attributions.black_baseline(model.card.preprocessing)
    worst = 0.0
    for seed in range(3):
        image = _images(1, 64, 20 + seed)
        with torch.no_grad():
            logits = tiny.module(torch.from_numpy(np.concatenate([image, black]))).numpy()
        top2 = np.argsort(-logits[0])[:2]
        by_rise = np.argsort(-np.abs(logits[0] - logits[1]))[:2]  # well-conditioned classes
        for baseline, classes, rule in [(None, top2, "middle"), (None, top2, "trapezoid"),
                                        (black, by_rise, "middle")]:
            counting = Counting(model)
            result = attributions.integrated_gradients(image, classes, counting, baseline,
                                                       steps=64, rule=rule)
            assert counting.batches == [attributions.batch_size(
                "integrated_gradients", steps=64, rule=rule)]
            assert result.attributions.shape == (2, 3, 64, 64)
            assert result.maps.shape == (2, 64, 64)
            start = logits[1] if baseline is not None else tiny.module(
                torch.zeros(1, 3, 64, 64)).detach().numpy()[0]
            rise = logits[0, classes] - start[classes]
            total = result.attributions.sum(axis=(1, 2, 3))
            error = np.abs(total - rise) / np.abs(rise)
            worst = max(worst, float(error.max()))
            assert (error <= 0.02).all(), (seed, rule, total, rise)
            np.testing.assert_allclose(result.delta, total - rise, atol=1e-4 * np.abs(rise).max())
    print(f"IG completeness: worst relative error {worst:.2e}")


def test_integrated_gradients_of_the_baseline_itself_is_zero(tiny_model_loaded):
    image = _images(1, 64, 3)
    result = attributions.integrated_gradients(image, np.array([1]),
                                               tiny_model_loaded.gradients_of, image, steps=4)
    assert not result.attributions.any() and abs(float(result.delta[0])) < 1e-6


def test_saliency_is_one_call_and_matches_torch(tiny, tiny_model_loaded):
    image = _images(1, 64, 5)
    counting = Counting(tiny_model_loaded)
    maps = attributions.saliency(image, np.array([2, 8]), counting)
    assert counting.batches == [1] and maps.shape == (2, 64, 64)
    _, _, reference = _reference(tiny.module, image, [[2, 8]])
    expected = methods.normalize_maps(np.abs(reference.value[0]).max(axis=1))
    np.testing.assert_allclose(maps, expected, atol=1e-4)


def test_smoothgrad_is_one_call(tiny_model_loaded):
    image = _images(1, 64, 6)
    counting = Counting(tiny_model_loaded)
    maps = attributions.smoothgrad(image, np.array([2, 8]), counting, n_samples=12, sigma=0.2,
                                   rng=np.random.default_rng(1))
    assert counting.batches == [12] == [attributions.batch_size("smoothgrad", n_samples=12)]
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and 0.99 < maps.max() <= 1
    again = attributions.smoothgrad(image, np.array([2, 8]), tiny_model_loaded.gradients_of,
                                    n_samples=12, sigma=0.2, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(maps, again)
    with pytest.raises(CamserveError, match="explicit class indices"):
        attributions.smoothgrad(image, np.array([-1]), counting, n_samples=2)


def test_guided_gradcam_shape_and_range(tiny_model_loaded):
    model = tiny_model_loaded
    image = _images(1, 64, 8)
    classes = np.array([2, 8])
    gradient_maps = attributions.saliency(image, classes, model.gradients_of)
    _, _, per_layer = model.run(image, classes[None], [model.card.layers[0].name])
    ((activations, gradients),) = per_layer.values()
    cam_maps = methods.cam_maps("gradcam", [(activations[0], gradients[0])], None)  # 32 x 32
    assert cam_maps.shape == (2, 32, 32)
    guided = attributions.guided_gradcam(gradient_maps, cam_maps)
    assert guided.shape == (2, 64, 64) and guided.dtype == np.float32
    assert guided.min() >= 0 and 0.99 < guided.max() <= 1
    with pytest.raises(CamserveError, match="same K"):
        attributions.guided_gradcam(gradient_maps, cam_maps[:1])


def test_registry_and_baselines(tiny_model_loaded):
    assert set(attributions.METHODS) == {"saliency", "smoothgrad", "integrated_gradients",
                                         "guided_gradcam"}
    assert attributions.method("smoothgrad").function is attributions.smoothgrad
    with pytest.raises(CamserveError, match="unknown attribution method"):
        attributions.method("deeplift")
    assert attributions.batch_size("integrated_gradients", steps=64) == 66  # + both ends
    assert attributions.batch_size("integrated_gradients", steps=64, rule="trapezoid") == 64
    p = tiny_model_loaded.card.preprocessing
    black = attributions.black_baseline(p)
    assert black.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(black[0, :, 0, 0], -np.asarray(p.mean) / np.asarray(p.std),
                               rtol=1e-6)


# --- 5. the CLI ---------------------------------------------------------------------------------

def test_cli_writes_the_companion(tmp_path, capsys):
    code = camserve_main(["export", "--arch", "resnet18", "--input-size", "96",
                          "--input-gradients", "--out", str(tmp_path), "--name", "r"])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(os.listdir(tmp_path)) == ["r.head.onnx", "r.onnx", "r.saliency.onnx"]
    assert f"wrote {tmp_path / 'r.saliency.onnx'}" in out
    session = ort.InferenceSession(str(tmp_path / "r.saliency.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits, classes, grads = session.run(None, {
        contract.IMAGE: _images(1, 96, 0), contract.TARGETS: np.array([[-1]], np.int64)})
    assert logits.shape == (1, 1000) and grads.shape == (1, 1, 3, 96, 96)
    assert np.isfinite(grads).all() and np.abs(grads).max() > 0


@pytest.fixture(scope="module")
def served_tiny(tiny):
    from camserve.client import Client
    from camserve.server.app import start
    from camserve.server.config import ServerConfig

    running = start(ServerConfig(models=tiny.path.parent, port=0, device="cpu"))
    with Client(f"127.0.0.1:{running.port}", timeout=60) as client:
        yield client
    running.stop(grace=0)


def test_input_space_methods_over_grpc(served_tiny, tiny_model_loaded):
    image = _images(1, 64, seed=11)
    assert {"saliency", "smoothgrad", "integrated_gradients", "guided_gradcam"} <= set(
        served_tiny.get_model("tiny").methods)
    classes = np.array([3, 6])
    expected = {
        "saliency": attributions.saliency(image, classes, tiny_model_loaded.gradients_of),
        "integrated_gradients": attributions.integrated_gradients(
            image, classes, tiny_model_loaded.gradients_of,
            attributions.black_baseline(tiny_model_loaded.card.preprocessing), 16).maps,
    }
    for method in ("saliency", "smoothgrad", "integrated_gradients", "guided_gradcam"):
        found = served_tiny.explain(tensor=image, targets=[3, 6], method=method,
                                    ig_steps=16, noise_samples=4, seed=2)
        assert [e.class_index for e in found] == [3, 6]
        for k, explanation in enumerate(found):
            m = explanation.cam_input
            assert m.shape == (64, 64) and 0 <= m.min() and m.max() <= 1 + 1e-3
            if method in expected:
                np.testing.assert_allclose(m, expected[method][k], atol=2e-3)


def test_input_space_method_without_companion_is_a_clear_error(server):
    import grpc

    from camserve.client import Client

    with Client(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(grpc.RpcError) as err:
            client.explain(np.zeros((20, 20, 3), np.uint8), method="saliency")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--input-gradients" in err.value.details()
