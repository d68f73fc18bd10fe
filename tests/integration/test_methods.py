"""Every gradient-based CAM method, served over gRPC, against grad-cam 1.5.7 (test-only
dependency) on the same weights, input tensor, layer and target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from camserve.client import Client
from camserve.explain import methods
from camserve.explain.smoothing import perturbed_batch
from camserve.export import export_explainer
from camserve.server.app import start
from camserve.server.config import ServerConfig

pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import (  # noqa: E402
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

REFERENCE = {
    "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM,
    "layercam": LayerCAM, "hirescam": HiResCAM, "gradcam_elementwise": GradCAMElementWise,
    "eigencam": EigenCAM, "eigengradcam": EigenGradCAM,
}
SIZE = 128


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(3)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def served(resnet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet")
    result = export_explainer(resnet, folder / "resnet18.onnx", input_size=SIZE,
                              target_layers=["layer3", "layer4"], architecture="resnet18")
    assert result.head_layers == ("layer3", "layer4")  # the default export writes the head
    running = start(ServerConfig(models=folder, port=0, device="cpu"))
    with Client(f"127.0.0.1:{running.port}", timeout=60) as client:
        yield client
    running.stop(grace=0)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(4)
    return torch.randn(1, 3, SIZE, SIZE)


def reference_map(model, method, layers, image, target):
    with REFERENCE[method](model=model, target_layers=layers) as explainer:
        return explainer(input_tensor=image, targets=[ClassifierOutputTarget(target)])[0]


def test_registry_matches_the_reference_list():
    assert set(REFERENCE) <= set(methods.METHODS)


@pytest.mark.parametrize("method", list(REFERENCE))
def test_served_map_equals_grad_cam(served, resnet, image, method):
    target = 7
    got = served.explain(tensor=image.numpy(), targets=[target], method=method,
                         layers=["layer4"])[0].cam_input
    expected = reference_map(resnet, method, [resnet.layer4], image, target)
    assert got.shape == expected.shape == (SIZE, SIZE)
    assert np.abs(got - expected).max() <= 1e-3


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_two_layer_fusion_equals_grad_cam(served, resnet, image, method):
    got = served.explain(tensor=image.numpy(), targets=[11], method=method,
                         layers=["layer3", "layer4"], fusion="mean")[0].cam_input
    expected = reference_map(resnet, method, [resnet.layer3, resnet.layer4], image, 11)
    assert np.abs(got - expected).max() <= 1e-3


def test_scorecam_equals_grad_cam(served, resnet, image):
    got = served.explain(tensor=image.numpy(), targets=[7], method="scorecam",
                         layers=["layer4"])[0].cam_input
    with ScoreCAM(model=resnet, target_layers=[resnet.layer4]) as explainer:
        explainer.batch_size = 64
        expected = explainer(input_tensor=image, targets=[ClassifierOutputTarget(7)])[0]
    assert np.abs(got - expected).max() <= 1e-2


def test_ablationcam_equals_grad_cam(served, resnet, image):
    got = served.explain(tensor=image.numpy(), targets=[7], method="ablationcam",
                         layers=["layer4"])[0].cam_input
    with AblationCAM(model=resnet, target_layers=[resnet.layer4]) as explainer:
        explainer.batch_size = 64
        expected = explainer(input_tensor=image, targets=[ClassifierOutputTarget(7)])[0]
    assert got.shape == expected.shape == (SIZE, SIZE)
    assert np.abs(got - expected).max() <= 1e-2


def test_every_method_gives_maps_for_several_targets(served, image):
    for method in methods.METHODS:  # the gradient methods; Score-CAM has its own test
        found = served.explain(tensor=image.numpy(), top_k=3, method=method)
        assert len(found) == 3
        for explanation in found:
            m = explanation.cam_input
            assert m.shape == (SIZE, SIZE) and np.isfinite(m).all()
            assert 0 <= m.min() and m.max() <= 1 + 1e-3


def test_noise_smoothing_is_one_batched_run_and_averages(served, resnet, image):
    plain = served.explain(tensor=image.numpy(), targets=[5], layers=["layer4"])[0].cam_input
    smooth = served.explain(tensor=image.numpy(), targets=[5], layers=["layer4"], noise_samples=8,
                            noise_sigma=0.15, seed=1)[0].cam_input
    again = served.explain(tensor=image.numpy(), targets=[5], layers=["layer4"], noise_samples=8,
                           noise_sigma=0.15, seed=1)[0].cam_input
    np.testing.assert_array_equal(smooth, again)  # seeded: reproducible
    assert np.abs(smooth - plain).max() > 1e-3   # and really averaged over noise
    # the same average computed here from grad-cam's maps of the same noisy copies
    rng = np.random.default_rng(1)
    batch, _ = perturbed_batch(image.numpy(), 8, 0.15, False, rng)
    maps = [reference_map(resnet, "gradcam", [resnet.layer4], torch.from_numpy(b[None]), 5)
            for b in batch]
    expected = methods.normalize_maps(np.mean(maps, axis=0)[None])[0]
    assert np.abs(smooth - expected).max() <= 1e-3


def test_flip_averages_the_mirrored_map(served, resnet, image):
    flipped = served.explain(tensor=image.numpy(), targets=[5], layers=["layer4"],
                             flip=True)[0].cam_input
    direct = reference_map(resnet, "gradcam", [resnet.layer4], image, 5)
    mirrored = reference_map(resnet, "gradcam", [resnet.layer4],
                             torch.flip(image, dims=[3]), 5)[:, ::-1]
    expected = methods.normalize_maps(((direct + mirrored) / 2)[None])[0]
    assert np.abs(flipped - expected).max() <= 1e-3


def test_raw_maps_keep_the_methods_units(served, image):
    raw = served.explain(tensor=image.numpy(), targets=[5], layers=["layer4"],
                         normalize=False)[0].cam_input
    normalized = served.explain(tensor=image.numpy(), targets=[5], layers=["layer4"])[0].cam_input
    assert raw.max() > 0 and not np.isclose(raw.max(), 1.0)
    np.testing.assert_allclose(methods.normalize_maps(raw[None])[0], normalized, atol=2e-3)


@pytest.fixture(scope="module")
def lite0_served(lite0_dir):
    running = start(ServerConfig(models=lite0_dir, port=0, device="cpu"))
    with Client(f"127.0.0.1:{running.port}", timeout=60) as client:
        yield client
    running.stop(grace=0)


def test_pretrained_lite0_maps_equal_grad_cam(lite0_served):
    from camserve.export.models import load

    model = load("efficientnet_lite0").module
    torch.manual_seed(5)
    image = torch.randn(1, 3, 224, 224)
    for method in REFERENCE:
        got = lite0_served.explain(tensor=image.numpy(), targets=[285],
                                   method=method)[0].cam_input
        expected = reference_map(model, method, [model._bn1], image, 285)
        assert np.abs(got - expected).max() <= 1e-3, method
