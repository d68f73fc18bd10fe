"""The CAM registry on plain arrays: each method against its paper's formula written out
channel by channel in float64, normalisation, layer fusion and smoothing's averaging.

The references loop over channels and pixels instead of reusing the implementation's
einsum/axis arithmetic, so a transposed axis or a wrong sum fails here in milliseconds.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camserve.explain import methods
from camserve.explain.smoothing import average_maps, perturbed_batch

C, K, H, W = 6, 3, 5, 4


@pytest.fixture
def arrays():
    rng = np.random.default_rng(7)
    activations = np.maximum(rng.standard_normal((C, H, W)), 0) + 0.01  # after a ReLU
    gradients = rng.standard_normal((K, C, H, W))
    return activations, gradients


def _sum_over_channels(per_channel) -> np.ndarray:
    """sum_c per_channel(k, c) -> [K,H,W], in a plain loop."""
    out = np.zeros((K, H, W))
    for k in range(K):
        for c in range(C):
            out[k] += per_channel(k, c)
    return out


def _reference(name: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    if name == "gradcam":
        return _sum_over_channels(lambda k, c: g[k, c].mean() * a[c])
    if name == "gradcam++":
        def weight(k, c):
            alpha = np.zeros((H, W))
            for i in range(H):
                for j in range(W):
                    gij = g[k, c, i, j]
                    if gij != 0:
                        alpha[i, j] = gij**2 / (2 * gij**2 + a[c].sum() * gij**3 + 1e-6)
            return (np.maximum(g[k, c], 0) * alpha).sum()
        return _sum_over_channels(lambda k, c: weight(k, c) * a[c])
    if name == "xgradcam":
        return _sum_over_channels(lambda k, c: (g[k, c] * a[c]).sum() / (a[c].sum() + 1e-7)
                                  * a[c])
    if name == "layercam":
        return _sum_over_channels(lambda k, c: np.maximum(g[k, c], 0) * a[c])
    if name == "hirescam":
        return _sum_over_channels(lambda k, c: g[k, c] * a[c])
    if name == "gradcam_elementwise":
        return _sum_over_channels(lambda k, c: np.maximum(g[k, c] * a[c], 0))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                                  "gradcam_elementwise"])
def test_gradient_methods_follow_their_formula(arrays, name):
    a, g = arrays
    np.testing.assert_allclose(methods.METHODS[name](a, g), _reference(name, a, g),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["eigencam", "eigengradcam"])
def test_eigen_methods_project_on_the_first_principal_component(arrays, name):
    a, g = arrays
    maps = methods.METHODS[name](a, g)
    assert maps.shape == (K, H, W)
    for k in range(K):
        source = a if name == "eigencam" else g[k] * a
        pixels = source.reshape(C, -1).T - source.reshape(C, -1).T.mean(axis=0)
        top = np.linalg.eigh(pixels.T @ pixels)[1][:, -1]  # largest eigenvector of X^T X
        expected = (pixels @ top).reshape(H, W)
        sign = np.sign(np.vdot(expected, maps[k]))  # the SVD's sign is arbitrary
        np.testing.assert_allclose(maps[k], sign * expected, rtol=1e-8, atol=1e-10)


def test_scorecam_weights_are_the_softmax_of_masked_logits(arrays):
    a, _ = arrays
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1, 3, H, W))
    head = rng.standard_normal((3 * H * W, 5))

    def logits_of(batch):  # a linear classifier on the flattened input
        return batch.reshape(len(batch), -1) @ head

    classes = np.array([4, 0])
    maps = methods.scorecam(a, methods.Forward(image, classes, logits_of, batch_size=4))
    scores = np.zeros((len(classes), C))
    for c in range(C):  # the feature map is the mask as it is: h, w = H, W here
        mask = (a[c] - a[c].min()) / (a[c].max() - a[c].min() + 1e-8)
        scores[:, c] = logits_of(image * mask)[0, classes]
    weights = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    expected = np.stack([sum(weights[k, c] * a[c] for c in range(C)) for k in range(2)])
    np.testing.assert_allclose(maps, expected, rtol=1e-6)


def test_ablationcam_weights_are_relative_logit_drops(arrays):
    a, _ = arrays
    fc = np.random.default_rng(2).standard_normal((C, 4))

    def head_logits_of(batch):  # global average pooling + a linear layer
        return batch.mean(axis=(2, 3)) @ fc + 10.0

    classes = np.array([1, 3])
    forward = methods.Forward(np.zeros((1, 3, H, W)), classes, None, batch_size=4,
                              head_logits_of=head_logits_of)
    maps = methods.ablationcam(a, forward)
    y = head_logits_of(a[None])[0, classes]
    value = a.min() - methods.ABLATION_OFFSET  # min(A) > 0 here
    expected = np.zeros((2, H, W))
    for c in range(C):
        ablated = a.copy()
        ablated[c] = value
        drop = (y - head_logits_of(ablated[None])[0, classes]) / y
        expected += drop[:, None, None] * a[c]
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
    with pytest.raises(methods.MethodError, match="head"):
        methods.ablationcam(a, methods.Forward(forward.image, classes, None))


def test_normalisation_is_grad_cams_min_max():
    maps = np.array([[[1.0, 3.0], [5.0, 9.0]], [[-2.0, -2.0], [0.0, 2.0]]])
    out = methods.normalize_maps(maps)
    np.testing.assert_allclose(out[0], (maps[0] - 1) / (8 + 1e-7))
    np.testing.assert_allclose(out[1], (maps[1] + 2) / (4 + 1e-7))


def test_one_layer_map_is_relu_normalise_resize_normalise(arrays):
    a, g = arrays
    out = methods.cam_maps("hirescam", [(a, g)], (H * 2, W * 2))
    raw = np.maximum(_reference("hirescam", a, g), 0)
    low = raw.min(axis=(1, 2), keepdims=True)
    expected = (raw - low) / ((raw - low).max(axis=(1, 2), keepdims=True) + 1e-7)
    assert out.shape == (K, H * 2, W * 2) and out.dtype == np.float32
    resized = [cv2.resize(m.astype(np.float32), (W * 2, H * 2), interpolation=cv2.INTER_LINEAR)
               for m in expected]  # grad-cam's resize: OpenCV bilinear
    # and, as grad-cam's layer aggregation does even for one layer, min-max once more
    np.testing.assert_allclose(out, methods.normalize_maps(np.stack(resized)), atol=1e-6)
    np.testing.assert_allclose(methods.cam_maps("hirescam", [(a, g)], (H, W)), expected,
                               atol=1e-6)


@pytest.mark.parametrize("fusion", methods.FUSIONS)
def test_layer_fusion_then_normalises_once_more(arrays, fusion):
    a, g = arrays
    layers = [(a, g), (a * 2 + 1, -g)]
    one = [methods.cam_maps("layercam", [layer], (H, W)) for layer in layers]
    fused = methods.cam_maps("layercam", layers, (H, W), fusion)
    combined = {"mean": np.mean, "sum": np.sum, "max": np.max}[fusion](np.stack(one), axis=0)
    np.testing.assert_allclose(fused, methods.normalize_maps(np.maximum(combined, 0)),
                               atol=1e-6)


def test_unknown_method_and_fusion_say_what_exists(arrays):
    with pytest.raises(methods.MethodError, match="choose one of: gradcam"):
        methods.check_method("magic")
    with pytest.raises(methods.MethodError, match="mean, sum, max"):
        methods.cam_maps("gradcam", [arrays], None, "median")
    assert methods.DEFAULT_METHOD in methods.method_names()


def test_smoothing_batch_and_its_mirrored_average():
    image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 3, 2, 4)
    batch, mirrored = perturbed_batch(image, 0, 0.0, True, np.random.default_rng(0))
    assert batch.shape == (2, 3, 2, 4) and mirrored.tolist() == [False, True]
    np.testing.assert_array_equal(batch[1], image[0, :, :, ::-1])
    noisy, _ = perturbed_batch(image, 3, 0.1, False, np.random.default_rng(0))
    spread = float(image.max() - image.min())
    assert noisy.shape == (3, 3, 2, 4)
    assert 0.02 * spread < np.std(noisy - image) < 0.2 * spread
    maps = np.stack([np.arange(8.0).reshape(1, 2, 4), np.arange(8.0).reshape(1, 2, 4)[..., ::-1]])
    np.testing.assert_allclose(average_maps(maps, mirrored, normalize=False),
                               np.arange(8.0).reshape(1, 2, 4))
