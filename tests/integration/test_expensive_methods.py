"""Score-CAM and Ablation-CAM as they run now (masks made per batch in float32, one reused
batch buffer): the masks against torch's align-corners upsampling and grad-cam's scaling,
the maps independent of the batch size, and several targets from one set of extra runs
against grad-cam 1.5.7, one target at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camserve.client import Client
from camserve.explain import methods
from camserve.explain.pipeline import Direct, Pipeline
from camserve.server.runtime import load_model

pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import AblationCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

LAYER = "features"  # TinyNet's convolutional part, ending in a ReLU: [16,32,32] at 64x64


@pytest.fixture(scope="module")
def model(models_dir):
    return load_model(models_dir / "tiny.onnx", "cpu", threads=1)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((1, 3, 64, 64)).astype(np.float32)


@pytest.mark.parametrize(("grid", "size"), [((7, 7), (224, 224)), ((5, 9), (40, 72)),
                                            ((1, 4), (16, 16))])
def test_score_masks_equal_torch_upsampling_and_grad_cams_scaling(grid, size):
    rng = np.random.default_rng(1)
    maps = np.maximum(rng.standard_normal((6, *grid)), 0).astype(np.float32)
    maps[2] = 0.0  # a dead channel: its mask is all zeros, (0 - 0) / (0 + 1e-8)
    got = methods.score_masks(maps, *size)
    upsampled = torch.nn.UpsamplingBilinear2d(size=size)(torch.from_numpy(maps)[None])[0]
    flat = upsampled.reshape(len(maps), -1)
    low, high = flat.min(dim=1)[0][:, None, None], flat.max(dim=1)[0][:, None, None]
    expected = ((upsampled - low) / (high - low + 1e-8)).numpy()
    assert got.dtype == np.float32 and got.shape == (6, *size)
    assert np.abs(got - expected).max() <= 1e-6
    assert not got[2].any()
    assert got.reshape(6, -1).max(axis=1)[[0, 1, 3, 4, 5]].min() > 0.99  # scaled to [0, 1]


def test_scorecam_maps_do_not_depend_on_the_batch_size(model, image):
    _, classes, per_layer = model.run(image, np.array([[-1, 4]], np.int64), [LAYER])
    activations = per_layer[LAYER][0][0]
    runs = []

    def logits_of(batch: np.ndarray) -> np.ndarray:
        runs.append(len(batch))
        return model.logits(batch)

    maps = {}
    for size in (1, 5, 16, 40):
        runs.clear()
        forward = methods.Forward(image, classes[0], logits_of, batch_size=size)
        maps[size] = methods.scorecam(activations, forward)
        channels = len(activations)
        assert runs == [min(size, channels - start) for start in range(0, channels, size)]
    for size in (1, 5, 40):
        np.testing.assert_allclose(maps[size], maps[16], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("method", "reference"), [("scorecam", ScoreCAM),
                                                   ("ablationcam", AblationCAM)])
def test_several_targets_from_one_set_of_runs_equal_grad_cam(model, tiny_model, image, method,
                                                             reference):
    targets = [3, 8, 0]
    request = Client.request(tensor=image, targets=targets, method=method, layers=[LAYER])
    explained = Pipeline().explain(request, model, Direct(model))
    layer = dict(tiny_model.named_modules())[LAYER]
    for target, found in zip(targets, explained.targets):
        with reference(model=tiny_model, target_layers=[layer]) as explainer:
            expected = explainer(input_tensor=torch.from_numpy(image),
                                 targets=[ClassifierOutputTarget(target)])[0]
        assert found.class_index == target
        assert found.cam.shape == expected.shape == (64, 64)
        assert np.abs(found.cam - expected).max() <= 1e-4
