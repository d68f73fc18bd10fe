"""The head companion ``<stem>.head.onnx`` (each layer's activations -> logits) and
Ablation-CAM on it: the heads against the explainer's own logits, the file against the
companion contract, layers whose head cannot be cut out, and the errors over gRPC.

Exports: TinyNet with one layer and with two, a random resnet18 at 64x64 with ``layer4`` and
``layer4.0.conv1`` (whose block adds ``layer3``'s output back: a skip connection crossing the
cut), and a small residual net whose only layer has no head.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradcheck
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from camserve import contract
from camserve.client import Client
from camserve.contract import ModelCard
from camserve.explain import methods
from camserve.export import ExportResult, export_explainer
from camserve.server.app import start
from camserve.server.config import ServerConfig
from camserve.server.runtime import MissingCompanionError, load_model, load_models


@dataclass
class Exported:
    module: torch.nn.Module
    result: ExportResult
    size: int

    @property
    def head(self) -> Path:
        assert self.result.head is not None
        return self.result.head


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("heads")


@pytest.fixture(scope="module")
def tiny(folder, tiny_model) -> Exported:
    return Exported(tiny_model, export_explainer(tiny_model, folder / "tiny.onnx",
                                                 input_size=64, architecture="tinynet"), 64)


@pytest.fixture(scope="module")
def tiny2(folder, tiny_model) -> Exported:
    result = export_explainer(tiny_model, folder / "tiny2.onnx", input_size=64,
                              target_layers=["features.2", "features.6"], architecture="tinynet")
    return Exported(tiny_model, result, 64)


@pytest.fixture(scope="module")
def resnet(folder) -> Exported:
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    result = export_explainer(module, folder / "r18.onnx", input_size=64,
                              target_layers=["layer4", "layer4.0.conv1"], architecture="resnet18")
    return Exported(module, result, 64)


@pytest.fixture(scope="module")
def served(tiny, tiny2, resnet, folder, tmp_path_factory):
    """A server on the folder above plus ``bare``: TinyNet without its head companion."""
    shutil.copy(tiny.result.path, folder / "bare.onnx")
    running = start(ServerConfig(models=folder, port=0, device="cpu", intra_op_threads=1))
    with Client(f"127.0.0.1:{running.port}", timeout=60) as client:
        yield client
    running.stop(grace=0)


def _images(count: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size), np.float32)


# --- the heads against the explainer ------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny2", "resnet"])
def test_head_logits_equal_the_explainers(request, name):
    exported: Exported = request.getfixturevalue(name)
    card = exported.result.card
    main = ort.InferenceSession(str(exported.result.path), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(exported.head), providers=["CPUExecutionProvider"])
    images = _images(3, exported.size, 1)
    outputs = dict(zip([o.name for o in main.get_outputs()], main.run(
        None, {contract.IMAGE: images, contract.TARGETS: np.full((3, 1), -1, np.int64)})))
    logits = outputs[contract.LOGITS]
    heads = [layer for layer in card.layers if layer.name in exported.result.head_layers]
    names = dict(zip([layer.name for layer in card.layers],
                     contract.head_output_names([layer.name for layer in card.layers])))
    # every head at once, each fed the explainer's activations of its layer
    got = head.run([names[layer.name] for layer in heads],
                   {layer.activations: outputs[layer.activations] for layer in heads})
    for layer, value in zip(heads, got):
        np.testing.assert_allclose(value, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max(),
                                   err_msg=layer.name)
    # and one at a time as the server runs them (the other inputs fed batch 0)
    model = load_model(exported.result.path, device="cpu")
    assert model.head_layers == exported.result.head_layers
    for layer in heads:
        value = model.head_logits(layer.name, outputs[layer.activations][:2])
        np.testing.assert_allclose(value, logits[:2], rtol=1e-4,
                                   atol=1e-4 * np.abs(logits).max(), err_msg=layer.name)


def test_head_file_is_default_domain_onnx_describing_itself(tiny2):
    model = onnx.load(str(tiny2.head))
    onnx.checker.check_model(model, full_check=True)
    assert all(op.domain in ("", "ai.onnx") for op in model.opset_import)
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props[contract.KEY_COMPANION]) == {"model": "tiny2", "kind": "head"}
    main = onnx.load(str(tiny2.result.path))
    assert ModelCard.from_metadata(props) == ModelCard.from_metadata(
        {p.key: p.value for p in main.metadata_props})
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.input) + list(model.graph.output)}
    assert shapes == {"activations.features.2": ["B0", 8, 64, 64],
                      "activations.features.6": ["B1", 16, 32, 32],
                      "logits.features.2": ["B0", 10], "logits.features.6": ["B1", 10]}
    assert not model.graph.input[0].name.startswith("head/")  # no scoped name leaks out


def test_resnet_layer4_head_is_the_fc_layer_alone(resnet):
    model = onnx.load(str(resnet.head))
    assert [v.name for v in model.graph.input] == ["activations.layer4"]
    assert [v.name for v in model.graph.output] == ["logits.layer4"]
    assert sorted(n.op_type for n in model.graph.node) == ["Flatten", "Gemm",
                                                            "GlobalAveragePool"]
    assert resnet.head.stat().st_size < 2.1e6  # 512 x 1000 weights and 1000 biases


# --- layers without a head ----------------------------------------------------------------------

def test_a_skip_connection_across_the_cut_leaves_the_layer_out(resnet):
    assert resnet.result.head_layers == ("layer4",)
    model = load_model(resnet.result.path, device="cpu")
    assert model.head_layers == ("layer4",)
    with pytest.raises(MissingCompanionError, match="skip connection.*explain: layer4"):
        model.head_logits("layer4.0.conv1", np.zeros((1, 512, 2, 2), np.float32))


class SkipNet(torch.nn.Module):
    """conv0 -> relu -> [conv1 -> relu -> conv2] + skip -> relu -> pool -> fc: conv1's head
    reads conv0's output too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv0(x))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        return self.fc(x.mean(dim=(2, 3)))


def test_no_layer_with_a_head_writes_no_head_file(tmp_path):
    torch.manual_seed(0)
    module = SkipNet().eval()
    result = export_explainer(module, tmp_path / "s.onnx", input_size=32,
                              target_layers=["conv0", "conv1"])
    assert result.head == tmp_path / "s.head.onnx" and result.head_layers == ("conv0",)
    result = export_explainer(module, tmp_path / "s.onnx", input_size=32,
                              target_layers=["conv1"])
    assert result.head is None and result.head_layers == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]  # the stale head is gone


class ViewNet(torch.nn.Module):
    """Flattens with the image's batch size, as EfficientNet-PyTorch does: the head reads a
    shape computed from the image (Shape, Gather, Concat), which the head recomputes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(features.view(x.size(0), -1))


def test_a_shape_read_from_before_the_cut_is_recomputed_in_the_head(tmp_path):
    torch.manual_seed(0)
    module = ViewNet().eval()
    result = export_explainer(module, tmp_path / "v.onnx", input_size=32,
                              target_layers=["conv"])
    assert result.head_layers == ("conv",)
    model = load_model(result.path, device="cpu")
    images = _images(3, 32, 2)
    logits, classes, per_layer = model.run(images, np.full((3, 1), -1, np.int64), ["conv"])
    activations, gradients = per_layer["conv"]
    for count in (1, 3):  # the batch size comes from the activations, not the export
        np.testing.assert_allclose(model.head_logits("conv", activations[:count]),
                                   logits[:count], rtol=1e-5, atol=1e-5)
    # the explainer's own head (a Scan per sample: the pooling is no global one) does the
    # same; it used to slice the shape tensor as if it were a batch
    double = gradcheck.float64(module)

    def autograd(x: np.ndarray) -> np.ndarray:  # float64 d logit / d conv output [3,8,32,32]
        conv = double.conv(torch.from_numpy(x)).detach().requires_grad_(True)
        pooled = torch.nn.functional.adaptive_avg_pool2d(torch.relu(conv), 4)
        double.fc(pooled.view(3, -1))[range(3), classes[:, 0]].sum().backward()
        return conv.grad.numpy()

    reference = gradcheck.Reference(autograd(images.astype(np.float64)), lambda: [
        autograd(x) for x in gradcheck.neighbours(images)])
    gradcheck.assert_gradients_close(gradients[:, 0], reference)


def test_efficientnet_lite0_has_a_head(lite0_dir):
    model = load_model(lite0_dir / "efficientnet_lite0.onnx", device="cpu")
    layer = model.card.layers[0]
    assert model.head_layers == (layer.name,)
    images = _images(2, 224, 3)
    logits, _, per_layer = model.run(images, np.full((2, 1), -1, np.int64), [layer.name])
    np.testing.assert_allclose(model.head_logits(layer.name, per_layer[layer.name][0]), logits,
                               rtol=1e-4, atol=1e-4 * np.abs(logits).max())


# --- over gRPC ----------------------------------------------------------------------------------

def test_served_ablationcam_equals_grad_cam_with_two_layers_fused(served, tiny_model):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    image = torch.from_numpy(_images(1, 64, 5))
    found = served.explain(tensor=image.numpy(), targets=[3, 8], method="ablationcam",
                           model="tiny2", fusion="mean")
    layers = [tiny_model.features[2], tiny_model.features[6]]
    with AblationCAM(model=tiny_model, target_layers=layers) as explainer:
        for explanation in found:
            expected = explainer(input_tensor=image,
                                 targets=[ClassifierOutputTarget(explanation.class_index)])[0]
            assert np.abs(explanation.cam_input - expected).max() <= 1e-2


def test_ablationcam_on_a_layer_without_a_head_is_invalid_argument(served):
    image = _images(1, 64, 0)
    assert served.explain(tensor=image, method="ablationcam", model="r18",
                          layers=["layer4"])[0].cam_input.shape == (64, 64)
    with pytest.raises(grpc.RpcError) as err:
        served.explain(tensor=image, method="ablationcam", model="r18",
                       layers=["layer4.0.conv1"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "skip connection" in err.value.details() and "layer4" in err.value.details()
    # the other methods still explain it
    assert served.explain(tensor=image, model="r18", layers=["layer4.0.conv1"])


def test_ablationcam_without_a_head_file_says_to_export_again(served, caplog):
    with pytest.raises(grpc.RpcError) as err:
        served.explain(tensor=_images(1, 64, 0), method="ablationcam", model="bare")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bare.head.onnx" in err.value.details() and "export it again" in err.value.details()


def test_head_companions_load_quietly_and_are_no_models(tiny, tiny2, resnet, caplog):
    with caplog.at_level(logging.INFO, logger="camserve.server"):
        models = load_models(tiny.result.path.parent, device="cpu")
    assert "tiny.head" not in models and "tiny" in models
    assert models["tiny2"].head_layers == ("features.2", "features.6")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_ablationcam_runs_the_head_in_batches():
    activations = np.random.default_rng(0).random((70, 3, 3)).astype(np.float32)
    weights = np.random.default_rng(1).standard_normal((70, 4)).astype(np.float32)
    batches = []

    def head(batch: np.ndarray) -> np.ndarray:
        batches.append(len(batch))
        return batch.mean(axis=(2, 3)) @ weights + 1

    forward = methods.Forward(np.zeros((1, 3, 8, 8), np.float32), np.array([2, 0]), None,
                          batch_size=32, head_logits_of=head)
    maps = methods.ablationcam(activations, forward)
    assert batches == [32, 32, 7]  # 70 ablated copies and the activations themselves
    assert maps.shape == (2, 3, 3)
    # min(A) > 0: a channel is ablated to min(A) - 1e7
    pooled = activations.mean(axis=(1, 2))
    original = pooled @ weights + 1
    ablated = activations.min() - 1e7
    expected = np.stack([(original[k] - (original[k] + (ablated - pooled) * weights[:, k]))
                         / original[k] for k in (2, 0)])
    np.testing.assert_allclose(maps, np.einsum("kc,chw->khw", expected, activations),
                               rtol=1e-3)
    with pytest.raises(methods.MethodError, match="head"):
        methods.ablationcam(activations, methods.Forward(forward.image, forward.classes, None))


def test_get_model_lists_ablationcam_only_with_a_head(server):
    from camserve.client import Client

    with Client(f"127.0.0.1:{server.port}") as client:
        methods = client.get_model("tiny").methods
    assert "gradcam" in methods and "scorecam" in methods
    assert "ablationcam" in methods  # the tests' models are exported with their head


def test_model_without_a_head_does_not_offer_ablationcam(models_dir, tmp_path):
    from camserve.server.repository import ModelRepository
    from camserve.server.runtime import load_models
    from camserve.server.service import ExplainerService

    (tmp_path / "tiny.onnx").write_bytes((models_dir / "tiny.onnx").read_bytes())
    models = load_models(tmp_path, device="cpu")
    methods = ExplainerService(ModelRepository(models)).model_info(models["tiny"]).methods
    assert "ablationcam" not in methods and "gradcam" in methods
