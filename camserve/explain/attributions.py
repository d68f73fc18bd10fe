"""Input-space attributions from the saliency companion's gradients, with NumPy alone.

Every method that needs gradients builds one batch and runs the companion exactly once,
through a callable (``ExplainerModel.gradients_of`` is one):

    gradients_of(batch [S,3,H,W] float32, classes [K] int64)
        -> (logits [S,N] float32, grads [S,K,3,H,W] float32)
    grads[s,k] = d logits[s, classes[k]] / d batch[s]

``image`` is one preprocessed image [1,3,H,W] float32 (as the model's ``image`` input) and
``classes`` [K] are explicit class indices (>= 0): resolve "top-1" and friends on the clean
image first, since a noisy copy or a point on a path may rank the classes differently.
Maps come back [K,H,W] float32 in [0, 1], normalised per map as ``methods.normalize_maps``
does, at the model's input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from camserve.contract import Preprocessing
from camserve.errors import CamserveError
from camserve.explain.geometry import resize_map
from camserve.explain.methods import MethodError, normalize_maps
from camserve.explain.smoothing import NOISE_SIGMA, perturbed_batch

GradientsOf = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

SMOOTHGRAD_SAMPLES = 25
SMOOTHGRAD_SIGMA = NOISE_SIGMA  # the same noise as the maps' smoothing
IG_STEPS = 64
IG_RULES = ("middle", "trapezoid", "left", "right")


def saliency(image: np.ndarray, classes: np.ndarray, gradients_of: GradientsOf) -> np.ndarray:
    """Vanilla gradients (Simonyan et al., 2014): map = max_c |d logit / d image| -> [K,H,W]."""
    _, grads = _run(gradients_of, _check_image(image), classes)
    return normalize_maps(np.abs(grads[0]).max(axis=1))


def smoothgrad(image: np.ndarray, classes: np.ndarray, gradients_of: GradientsOf,
               n_samples: int = SMOOTHGRAD_SAMPLES, sigma: float = SMOOTHGRAD_SIGMA,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """SmoothGrad (Smilkov et al., 2017): map = max_c mean_s |grad(image + noise_s)| -> [K,H,W].

    ``n_samples`` noisy copies, Gaussian noise of std ``sigma`` * (max - min) of the image
    (``methods.perturbed_batch``), all in one run.
    """
    if n_samples < 1 or not sigma > 0:
        raise CamserveError(f"smoothgrad needs n_samples >= 1 and sigma > 0, got {n_samples} "
                            f"and {sigma}")
    rng = rng if rng is not None else np.random.default_rng()
    batch, _ = perturbed_batch(_check_image(image), n_samples, sigma, False, rng)
    _, grads = _run(gradients_of, batch, classes)
    return normalize_maps(np.abs(grads).mean(axis=0).max(axis=1))


class IntegratedGradients(NamedTuple):
    """``attributions`` [K,3,H,W]: signed, (x - x') * the path integral of the gradient;
    ``maps`` [K,H,W]: |sum over channels of attributions|, normalised to [0, 1] (Captum's
    "absolute_value" view: a pixel's net contribution, whatever its sign);
    ``delta`` [K]: completeness error, sum(attributions) - (logit(x) - logit(x'))."""

    attributions: np.ndarray
    maps: np.ndarray
    delta: np.ndarray


def integrated_gradients(image: np.ndarray, classes: np.ndarray, gradients_of: GradientsOf,
                         baseline: np.ndarray | None = None, steps: int = IG_STEPS,
                         rule: str = "middle") -> IntegratedGradients:
    """Integrated Gradients (Sundararajan et al., 2017) along the straight path x' -> x.

    ``baseline`` x' [1,3,H,W] (default ``zero_baseline``; see ``black_baseline``).
    ``steps`` points on the path, weighted by ``rule`` as Captum's Riemann rules do:
    "middle" (the default), "left", "right": alphas (i + 1/2, 0 or 1) / steps, weights
    1/steps; "trapezoid": alphas linspace(0, 1, steps), weights 1/(steps - 1), halved at
    the ends. The midpoint rule is the default because it never samples the ends: at a zero
    baseline many ReLU inputs sit exactly on their kink, so the gradient *at* x' is not
    representative of the path, and the trapezoid rule's weight on it costs ~1/(2 steps)
    of completeness. Both ends are always in the batch (weight 0 where the rule does not
    sample them) so ``delta`` comes from the same single run, of
    ``batch_size("integrated_gradients", steps=steps, rule=rule)`` images.
    """
    image = _check_image(image)
    baseline = zero_baseline(image) if baseline is None else np.asarray(baseline, np.float32)
    if baseline.shape != image.shape:
        raise CamserveError(f"the baseline must have the image's shape {list(image.shape)}, "
                            f"got {list(baseline.shape)}")
    alphas, weights = _path(steps, rule)
    difference = image - baseline
    batch = baseline + alphas[:, None, None, None] * difference  # [S,3,H,W]
    logits, grads = _run(gradients_of, batch, classes)
    average = np.einsum("s,skchw->kchw", weights, grads)
    attributions = (difference * average).astype(np.float32)
    classes = np.asarray(classes, np.int64).reshape(-1)
    rise = logits[-1, classes] - logits[-2, classes]  # the last two rows are x' and x
    delta = attributions.sum(axis=(1, 2, 3)) - rise
    return IntegratedGradients(attributions, normalize_maps(np.abs(attributions.sum(axis=1))),
                               delta.astype(np.float32))


def guided_gradcam(saliency_map: np.ndarray, cam_map: np.ndarray) -> np.ndarray:
    """Guided Grad-CAM's product: saliency [K,H,W] * Grad-CAM [K,h,w] (resized bilinearly to
    H x W when it differs), renormalised to [0, 1] -> [K,H,W].

    As in the paper, a high-resolution gradient map gated by the class-discriminative CAM;
    unlike it, the gradient map is vanilla ``saliency`` (or ``smoothgrad``), not guided
    backpropagation, which would need a modified ReLU backward in the graph.
    """
    saliency_map = np.asarray(saliency_map, np.float32)
    cam_map = np.asarray(cam_map, np.float32)
    if saliency_map.ndim != 3 or cam_map.ndim != 3 or len(saliency_map) != len(cam_map):
        raise CamserveError(f"guided_gradcam needs two map stacks [K,H,W] with the same K, got "
                            f"{list(saliency_map.shape)} and {list(cam_map.shape)}")
    height, width = saliency_map.shape[1:]
    resized = np.stack([resize_map(m, height, width) for m in cam_map])
    return normalize_maps(saliency_map * resized)


def zero_baseline(image: np.ndarray) -> np.ndarray:
    """Zeros in preprocessed space: the dataset's mean colour. [1,3,H,W]"""
    return np.zeros_like(np.asarray(image, np.float32))


def black_baseline(preprocessing: Preprocessing, size: tuple[int, int] | None = None
                   ) -> np.ndarray:
    """A black photo in preprocessed space, (0 * scale - mean) / std per channel -> [1,C,H,W]
    (``size`` = (H, W), default the model's crop; C = ``preprocessing.channels``)."""
    height, width = size or preprocessing.crop
    black = -np.asarray(preprocessing.mean, np.float32) / np.asarray(preprocessing.std,
                                                                     np.float32)
    return np.ascontiguousarray(np.broadcast_to(black[None, :, None, None],
                                                (1, len(black), height, width)))


def _path(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """alphas [S] and weights [S] for ``steps`` points; the last two are 0 (x') and 1 (x)."""
    if rule not in IG_RULES:
        raise CamserveError(f"unknown integration rule {rule!r}; choose one of: "
                            f"{', '.join(IG_RULES)}")
    if steps < (2 if rule == "trapezoid" else 1):
        raise CamserveError(f"integrated_gradients with the {rule} rule needs at least "
                            f"{2 if rule == 'trapezoid' else 1} steps, got {steps}")
    if rule == "trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
    else:
        offset = {"left": 0.0, "middle": 0.5, "right": 1.0}[rule]
        alphas = (np.arange(steps) + offset) / steps
        weights = np.full(steps, 1.0 / steps)
    # move x' (alpha 0) and x (alpha 1) to the end, adding them with weight 0 if missing
    ends = []
    for end in (0.0, 1.0):
        at = np.flatnonzero(alphas == end)
        ends.append(weights[at[0]] if len(at) else 0.0)
        alphas, weights = alphas[alphas != end], weights[alphas != end]
    alphas = np.concatenate([alphas, [0.0, 1.0]]).astype(np.float32)
    return alphas, np.concatenate([weights, ends]).astype(np.float32)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] not in (1, 3):
        raise CamserveError(f"an attribution explains one image [1,3,H,W] (or [1,1,H,W]), got "
                            f"{list(image.shape)}")
    return image


def _run(gradients_of: GradientsOf, batch: np.ndarray,
         classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one run of the companion, with its shapes checked."""
    classes = np.asarray(classes, np.int64).reshape(-1)
    if len(classes) == 0 or (classes < 0).any():
        raise CamserveError("input-space attributions need explicit class indices (>= 0); "
                            "resolve top-k targets on the clean image first")
    logits, grads = gradients_of(np.ascontiguousarray(batch, np.float32), classes)
    expected = (len(batch), len(classes), *batch.shape[1:])
    if grads.shape != expected:
        raise CamserveError(f"gradients_of returned {list(grads.shape)}, expected "
                            f"{list(expected)}")
    return logits, grads


@dataclass(frozen=True)
class Attribution:
    """A registered method: its function, what it shows, and what the caller passes."""

    function: Callable
    description: str
    needs: tuple[str, ...]  # arguments (``gradients_of``: the method runs the companion once)


METHODS: dict[str, Attribution] = {
    "saliency": Attribution(
        saliency, "vanilla gradients: max over channels of |d logit / d image|",
        ("image", "classes", "gradients_of")),
    "smoothgrad": Attribution(
        smoothgrad, "SmoothGrad: mean |gradient| over noisy copies, max over channels",
        ("image", "classes", "gradients_of", "n_samples", "sigma", "rng")),
    "integrated_gradients": Attribution(
        integrated_gradients, "Integrated Gradients from a baseline: signed [K,3,H,W] "
        "attributions and |sum over channels| maps, with the completeness error",
        ("image", "classes", "gradients_of", "baseline", "steps", "rule")),
    "guided_gradcam": Attribution(
        guided_gradcam, "gradient map x Grad-CAM map (vanilla gradients, not guided "
        "backpropagation), renormalised", ("saliency_map", "cam_map")),
}


def method(name: str) -> Attribution:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown attribution method {name!r}; choose one of: "
                          f"{', '.join(METHODS)}") from None


def batch_size(name: str, n_samples: int = SMOOTHGRAD_SAMPLES, steps: int = IG_STEPS,
               rule: str = "middle") -> int:
    """How many images the method's single run of the companion holds (for request limits);
    0 for ``guided_gradcam``, whose saliency map is computed by ``saliency`` (1 image)."""
    method(name)
    if name == "saliency":
        return 1
    if name == "smoothgrad":
        return n_samples
    if name == "integrated_gradients":
        return len(_path(steps, rule)[0])
    return 0
