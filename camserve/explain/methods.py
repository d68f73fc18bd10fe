"""Postprocessing: class activation maps from (activations, gradients) with NumPy alone.

Each method is one pure function ``(A [C,h,w], G [K,C,h,w]) -> raw maps [K,h,w]``, listed in
``METHODS``; adding a method is a function and a line. Methods that run the network again
(Score-CAM, Ablation-CAM) take ``(A [C,h,w], Forward)`` instead and are listed in
``FORWARD_METHODS``. ``cam_maps`` then applies the normalisation and upsampling of
grad-cam 1.5.7 so the maps are comparable with it:

    per layer:  ReLU -> per-map (x - min) / (max - min + 1e-7) -> bilinear resize
    layers:     fuse (mean, as grad-cam; sum; max) -> ReLU -> the same min-max once more
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from camserve.errors import CallerError
from camserve.explain.geometry import resize_map

CamMethod = Callable[[np.ndarray, np.ndarray], np.ndarray]
EPSILON = 1e-7


def gradcam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM: channel weights = spatial mean of the gradients; weighted sum of maps."""
    k, c, h, w = gradients.shape  # the mean as one matrix-vector product (BLAS)
    weights = np.reshape(gradients, (k * c, h * w)) @ _mean_vector(h * w, gradients.dtype)
    return _weighted(weights.reshape(k, c), activations)


@functools.lru_cache(maxsize=16)
def _mean_vector(size: int, dtype: np.dtype) -> np.ndarray:
    """[size] of 1/size: x @ it is the mean of x's rows."""
    return np.full(size, 1.0 / size, dtype)


def gradcam_plus_plus(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM++: w = sum_ij ReLU(G) * a, a = G^2 / (2 G^2 + sum_ij(A) G^3 + 1e-6), a = 0
    where G = 0."""
    squared = gradients**2
    denominator = 2 * squared + activations.sum(axis=(1, 2))[None, :, None, None] * gradients**3
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(gradients != 0, squared / (denominator + 1e-6), 0)
    return _weighted((np.maximum(gradients, 0) * alpha).sum(axis=(2, 3)), activations)


def xgradcam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """XGrad-CAM: w = sum_ij G * A / (sum_ij A + 1e-7)."""
    weights = (gradients * activations).sum(axis=(2, 3))
    return _weighted(weights / (activations.sum(axis=(1, 2)) + 1e-7), activations)


def layercam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """LayerCAM: map = sum_c ReLU(G) * A (element-wise weights)."""
    return (np.maximum(gradients, 0) * activations).sum(axis=1)


def hirescam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """HiResCAM: map = sum_c G * A."""
    return (gradients * activations).sum(axis=1)


def gradcam_elementwise(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Element-wise Grad-CAM: map = sum_c ReLU(G * A)."""
    return np.maximum(gradients * activations, 0).sum(axis=1)


def eigencam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """EigenCAM: projection of A on its first principal component (the same for every
    target; gradients only give the count K)."""
    return np.repeat(_first_component(activations)[None], gradients.shape[0], axis=0)


def eigengradcam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """EigenGradCAM: projection of G * A on its first principal component, per target."""
    return np.stack([_first_component(g * activations) for g in gradients])


def _weighted(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """sum_c weights[k,c] * A[c] -> [K,h,w] (one BLAS product; einsum's path search alone
    cost more than the product at 7x7)."""
    c, h, w = activations.shape
    return (weights @ np.reshape(activations, (c, h * w))).reshape(len(weights), h, w)


def _first_component(maps: np.ndarray) -> np.ndarray:
    """[C,h,w] -> [h,w]: the centred pixels [h*w,C] projected on the first right singular
    vector (the sign is whatever the SVD gives, as in grad-cam)."""
    pixels = maps.reshape(maps.shape[0], -1).T
    pixels = pixels - pixels.mean(axis=0)
    _, _, vt = np.linalg.svd(pixels, full_matrices=False)
    return (pixels @ vt[0]).reshape(maps.shape[1:])


METHODS: dict[str, CamMethod] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
    "gradcam_elementwise": gradcam_elementwise,
    "eigencam": eigencam,
    "eigengradcam": eigengradcam,
}


FORWARD_BATCH = 32  # masked images (Score-CAM) / ablated copies (Ablation-CAM) per run


@dataclass(frozen=True)
class Forward:
    """What a method that runs the network again needs: the model input [1,3,H,W], the
    resolved classes [K], ``logits_of(batch [S,3,H,W]) -> logits [S,N]`` (one batched
    graph run per call) and, for the layer being explained,
    ``head_logits_of(activations [S,C,h,w]) -> logits [S,N]`` (the network from that layer
    on: one batched run of the model's head companion; None when the caller has none)."""

    image: np.ndarray
    classes: np.ndarray
    logits_of: Callable[[np.ndarray], np.ndarray]
    batch_size: int = FORWARD_BATCH
    head_logits_of: Callable[[np.ndarray], np.ndarray] | None = None


def scorecam(activations: np.ndarray, forward: Forward) -> np.ndarray:
    """Score-CAM: each channel, upsampled and min-max scaled to [0,1], masks the input; the
    class logits of the C masked images, softmaxed over channels, are the weights.

    Costs C extra forward passes, run as batches of ``forward.batch_size``. Each batch's
    masks are made (``score_masks``) and multiplied into one reused buffer [S,3,H,W]
    float32, so the extra memory is one batch, not the C masks at the input size (resnet18
    ``layer4`` at 224: 512 x 224 x 224, 103 MB as float32).
    """
    image = forward.image  # [1,3,H,W]
    channels = len(activations)
    size = max(1, min(forward.batch_size, channels))
    batch = np.empty((size, *image.shape[1:]), np.float32)
    scores = []
    for start in range(0, channels, size):
        masks = score_masks(activations[start:start + size], *image.shape[2:])  # [S,H,W]
        chunk = np.multiply(masks[:, None], image, out=batch[:len(masks)])  # [S,3,H,W]
        scores.append(forward.logits_of(chunk)[:, forward.classes])
    logits = np.concatenate(scores).T  # [K,C]
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return _weighted(weights, activations)


def score_masks(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Score-CAM's masks: maps [S,h,w] upsampled to [S,H,W] (``upsample_align_corners``),
    each min-max scaled to [0, 1] as grad-cam does, (x - min) / (max - min + 1e-8); float32.
    """
    masks = upsample_align_corners(maps, height, width)
    flat = masks.reshape(len(masks), -1)
    flat -= flat.min(axis=1, keepdims=True)  # then max(flat) is max - min, rounded alike
    flat /= flat.max(axis=1, keepdims=True) + 1e-8
    return masks


ABLATION_OFFSET = 1e7  # grad-cam's ABLATION_VALUE


def ablationcam(activations: np.ndarray, forward: Forward) -> np.ndarray:
    """Ablation-CAM: each channel in turn is ablated -- set to 0 when min(A) = 0 (after a
    ReLU), else to min(A) - 1e7 -- and the network is continued from the layer (its head);
    w_c = (y - y_c) / y with y the class logit and y_c the logit with channel c ablated.

    Costs C extra runs of the head, in batches of ``forward.batch_size`` (the first batch
    also holds the activations as they are, for y).
    """
    if forward.head_logits_of is None:
        raise MethodError("method 'ablationcam' needs the layer's head graph (the model's "
                          ".head.onnx companion, written by 'camserve export')")
    channels = len(activations)
    low = activations.min()
    value = 0 if low == 0 else low - ABLATION_OFFSET
    rows = np.arange(channels + 1)  # row 0: nothing ablated; row 1 + c: channel c ablated
    scores = []
    for start in range(0, channels + 1, forward.batch_size):
        chunk = rows[start:start + forward.batch_size]
        batch = np.repeat(activations[None].astype(np.float32, copy=False), len(chunk), axis=0)
        ablated = chunk > 0
        batch[np.flatnonzero(ablated), chunk[ablated] - 1] = value
        scores.append(forward.head_logits_of(batch))
    logits = np.concatenate(scores)[:, forward.classes].T  # [K,C+1]
    original = logits[:, :1]
    return _weighted((original - logits[:, 1:]) / original, activations)


FORWARD_METHODS: dict[str, Callable[[np.ndarray, Forward], np.ndarray]] = {
    "scorecam": scorecam,
    "ablationcam": ablationcam,
}


def upsample_align_corners(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of maps [C,h,w] to float32 [C,H,W] with corners aligned (torch's
    UpsamplingBilinear2d, which Score-CAM uses): two float32 matrix products per map, a new
    array."""
    rows = _interpolation_matrix(maps.shape[1], height)  # [H,h]
    cols = _interpolation_matrix(maps.shape[2], width).T  # [w,W]
    return rows @ (np.asarray(maps, np.float32) @ cols)


@functools.lru_cache(maxsize=16)
def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] float32 weights of align-corners linear interpolation along one axis
    (cached: read-only)."""
    position = (np.arange(size_out) * ((size_in - 1) / (size_out - 1)) if size_out > 1
                else np.zeros(1))
    low = np.clip(np.floor(position).astype(int), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    fraction = position - low
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1 - fraction)
    np.add.at(matrix, (np.arange(size_out), high), fraction)
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


FUSIONS = ("mean", "sum", "max")  # how several layers' maps combine; the first is the default
DEFAULT_METHOD = "gradcam"  # what a request that names no method gets


class MethodError(CallerError):
    """An unknown method or fusion rule."""


def method_names() -> list[str]:
    return [*METHODS, *FORWARD_METHODS]


def check_method(name: str) -> None:
    if name not in METHODS and name not in FORWARD_METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of: "
                          f"{', '.join(method_names())}")


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Per-map min-max to [0, 1]: (x - min) / (max - min + 1e-7); maps [K,h,w]."""
    flat = np.reshape(maps, (len(maps), -1))
    return _normalize_rows(flat - flat.min(axis=1, keepdims=True)).reshape(maps.shape)


def _normalize_rows(shifted: np.ndarray) -> np.ndarray:
    """Rows of ``shifted`` (each minus its minimum) divided by their max + 1e-7, in place."""
    return np.divide(shifted, shifted.max(axis=1, keepdims=True) + EPSILON, out=shifted)


def _normalize_in_place(maps: np.ndarray) -> np.ndarray:
    """``normalize_maps`` of a C-contiguous float array that the caller owns, in place."""
    flat = maps.reshape(len(maps), -1)
    np.subtract(flat, flat.min(axis=1, keepdims=True), out=flat)
    _normalize_rows(flat)
    return maps


def cam_maps(method_name: str, layers: list[tuple[np.ndarray, np.ndarray]],
             size: tuple[int, int] | None, fusion: str = "mean",
             normalize: bool = True, forward: Forward | Sequence[Forward] | None = None
             ) -> np.ndarray:
    """Maps [K,H,W] for K targets from one image's per-layer (A [C,h,w], G [K,C,h,w]).

    ``size`` = (H, W) upsamples every map there; None keeps the finest layer grid.
    With ``normalize`` False the raw ReLU'd, fused maps come back unscaled. Methods in
    ``FORWARD_METHODS`` also need ``forward``: one for every layer, or one per layer (in
    the order of ``layers``; what ``ablationcam`` needs, whose ``head_logits_of`` is per
    layer).
    """
    check_method(method_name)
    forwards: list[Forward] = []
    if method_name in FORWARD_METHODS:
        if forward is None:
            raise MethodError(f"method {method_name!r} needs the model to run again")
        forwards = [forward] * len(layers) if isinstance(forward, Forward) else list(forward)
        if len(forwards) != len(layers):
            raise ValueError(f"{len(forwards)} forwards given for {len(layers)} layers")
    if fusion not in FUSIONS:
        raise MethodError(f"unknown layer fusion {fusion!r}; choose one of: {', '.join(FUSIONS)}")
    if size is None:
        size = max((a.shape[1:] for a, _ in layers), key=lambda hw: hw[0] * hw[1])
    per_layer = []
    for index, (activations, gradients) in enumerate(layers):
        raw = (FORWARD_METHODS[method_name](activations, forwards[index]) if forwards
               else METHODS[method_name](activations, gradients))
        maps = np.ascontiguousarray(np.maximum(raw, 0), dtype=np.float32)  # a new array
        if normalize:
            maps = _normalize_in_place(maps)
        per_layer.append(_resized(maps, *size))
    if len(per_layer) == 1:
        fused = per_layer[0]  # every fusion of one (ReLU'd) layer is that layer
    else:
        stacked = np.stack(per_layer)  # [L,K,H,W]
        reduce = {"mean": np.mean, "sum": np.sum, "max": np.max}[fusion]
        fused = np.maximum(reduce(stacked, axis=0), 0)
    return _normalize_in_place(fused) if normalize else fused


def _resized(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 maps [K,h,w] -> [K,height,width] with ``resize_map`` (itself when the size
    is already right), written straight into the result."""
    if maps.shape[1:] == (height, width):
        return maps
    out = np.empty((len(maps), height, width), np.float32)
    for cam, into in zip(maps, out):
        resize_map(cam, height, width, out=into)
    return out
