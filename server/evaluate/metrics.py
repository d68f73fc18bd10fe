"""Quantitative evaluation of class activation maps, with NumPy and OpenCV alone.

Every function here is pure: images are the model's *preprocessed* input, one image
``[3,H,W]`` float32 (normalised as the model's ``Preprocessing`` says) or a batch
``[B,3,H,W]``; maps are ``[H,W]`` float32 in [0, 1] at model-input size unless a function says
it works on the original photo's grid. Running the graph is the caller's business: the
curve functions build the perturbed batch, the caller runs it once and passes the class
probabilities back (``camserve evaluate`` does this in ``scoring.py``).

Metrics and the choices made for them:

* **Deletion / insertion** (Petsiuk et al., RISE, 2018). Pixels are ranked by map value,
  highest first (ties in raster order: a stable sort). For step i = 0..S the top i/S of the
  pixels are switched. *Deletion* starts from the image and switches pixels to the **mean
  colour** (zeros in preprocessed space, RISE's ``torch.zeros_like`` substrate); *insertion*
  starts from a **heavily blurred copy** (Gaussian, sigma = ``INSERTION_BLUR`` x the longer
  side) and switches pixels back to the original. Each curve is the softmax probability of
  the explained class over the S+1 images; its AUC is the trapezoid rule over x in [0, 1].
  Lower deletion AUC and higher insertion AUC are better.
* **Average drop / increase in confidence** (Chattopadhyay et al., Grad-CAM++, 2018).
  y = probability of the class on the image, o = on the image masked by the map:
  the *photo* (un-normalised pixels) multiplied by the map, then normalised, which in
  preprocessed space is ``black + map * (image - black)`` with black = -mean/std per
  channel (``masked_image``). drop = max(0, y - o) / y, increase = o > y; the caller averages
  them over images (the paper reports 100 x the mean drop, and the rate of increases).
* **Pointing game** (Zhang et al., 2016): a hit when the map's maximum on the photo's pixel
  grid lies inside any ground-truth box (no tolerance margin by default).
* **Box IoU** (the weakly supervised localisation protocol of CAM, Zhou et al., 2016): the
  map on the photo's grid is thresholded at t (map >= t); the bounding box of the largest
  8-connected region is compared with every ground-truth box and the best IoU is kept (0 when
  no pixel reaches t).
* **Random baseline**: a seeded uniform random map blurred with a Gaussian and min-max
  normalised, so it has blobs, as a reference a method should beat. ``camserve evaluate``
  blurs with half a cell of the explained layer's grid (``layer_cell_sigma``, 16 px for
  EfficientNet-Lite0's 7 x 7 on 224 x 224), so the random map is as coarse as the CAM and
  the two differ in *where* they put mass, not in how fine-grained they are: a
  finer-grained random map scatters many small holes over the whole image, which the
  deletion metric punishes far more than one coherent hole.

Boxes are (x0, y0, x1, y1) in original-photo pixels, ends exclusive (pixel (x, y) is inside
when x0 <= x < x1 and y0 <= y < y1), as ``camserve.client`` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

Box = tuple[float, float, float, float]

DEFAULT_STEPS = 20
DEFAULT_THRESHOLD = 0.5
INSERTION_BLUR = 0.05  # Gaussian sigma as a fraction of the image's longer side (~11 px at 224)
RANDOM_BLUR = 0.07  # the random baseline's default smoothing, same units (~16 px at 224)


# --- images in preprocessed space ---------------------------------------------------------


def mean_colour(image: np.ndarray) -> np.ndarray:
    """The deletion substrate for ``image`` [3,H,W]: zeros [3,H,W] float32, which is the
    normalisation's mean colour in preprocessed space."""
    return np.zeros_like(image, dtype=np.float32)


def blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each channel of ``image`` [3,H,W] with std ``sigma`` pixels
    (reflected borders) -> [3,H,W] float32.

    Blurring commutes with the per-channel affine normalisation, so this equals normalising a
    blurred photo.
    """
    planes = np.ascontiguousarray(image, dtype=np.float32)
    return np.stack([cv2.GaussianBlur(p, (0, 0), sigmaX=sigma, sigmaY=sigma,
                                      borderType=cv2.BORDER_REFLECT_101) for p in planes])


def insertion_start(image: np.ndarray, fraction: float = INSERTION_BLUR) -> np.ndarray:
    """The insertion curve's first image: ``image`` [3,H,W] blurred with sigma =
    ``fraction`` x max(H, W) -> [3,H,W]."""
    return blurred(image, fraction * max(image.shape[1:]))


def masked_image(image: np.ndarray, cam: np.ndarray, substrate: np.ndarray) -> np.ndarray:
    """``image`` [3,H,W] soft-masked by ``cam`` [H,W] in [0,1]: substrate + cam * (image -
    substrate) -> [3,H,W]. With ``substrate = attributions.black_baseline(spec)[0]`` this is
    the photo times the map, normalised (Grad-CAM++'s explanation map E = I * L)."""
    return (substrate + cam[None] * (image - substrate)).astype(np.float32)


# --- deletion and insertion ---------------------------------------------------------------


def pixel_order(cam: np.ndarray) -> np.ndarray:
    """Flat indices [H*W] of ``cam`` [H,W], highest value first (stable: ties in raster
    order)."""
    return np.argsort(-cam.ravel(), kind="stable")


def fractions(steps: int) -> np.ndarray:
    """The curve's x: [steps+1] float64, 0, 1/steps, ..., 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return np.linspace(0.0, 1.0, steps + 1)


def progressive_batch(start: np.ndarray, end: np.ndarray, cam: np.ndarray,
                      steps: int = DEFAULT_STEPS) -> np.ndarray:
    """[steps+1,3,H,W]: image i is ``start`` [3,H,W] with its top round(i/steps * H*W)
    pixels by ``cam`` [H,W] taken from ``end`` [3,H,W]. Image 0 is ``start``, the last is
    ``end``."""
    height, width = cam.shape
    rank = np.empty(height * width, dtype=np.int64)
    rank[pixel_order(cam)] = np.arange(height * width)
    counts = np.round(fractions(steps) * height * width).astype(np.int64)
    switched = (rank[None, :] < counts[:, None]).reshape(len(counts), 1, height, width)
    return np.where(switched, end[None], start[None]).astype(np.float32)


def deletion_batch(image: np.ndarray, cam: np.ndarray, steps: int = DEFAULT_STEPS,
                   substrate: np.ndarray | None = None) -> np.ndarray:
    """Deletion images [steps+1,3,H,W] for ``image`` [3,H,W] and ``cam`` [H,W]: the most
    salient pixels progressively replaced by ``substrate`` (default the mean colour)."""
    end = mean_colour(image) if substrate is None else substrate
    return progressive_batch(image, end, cam, steps)


def insertion_batch(image: np.ndarray, cam: np.ndarray, steps: int = DEFAULT_STEPS,
                    start: np.ndarray | None = None) -> np.ndarray:
    """Insertion images [steps+1,3,H,W] for ``image`` [3,H,W] and ``cam`` [H,W]: from
    ``start`` (default ``insertion_start(image)``) the most salient pixels progressively
    restored."""
    first = insertion_start(image) if start is None else start
    return progressive_batch(first, image, cam, steps)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits [B,N] -> [B,N] float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def class_probability(logits: np.ndarray, class_index: int) -> np.ndarray:
    """Softmax probability of ``class_index`` per row of logits [B,N] -> [B]."""
    return softmax(logits)[:, class_index]


def auc(curve: Sequence[float] | np.ndarray) -> float:
    """Area under ``curve`` [S+1] sampled at x = 0, 1/S, ..., 1 (trapezoid rule)."""
    y = np.asarray(curve, dtype=np.float64)
    if y.ndim != 1 or len(y) < 2:
        raise ValueError("a curve needs at least two points")
    return float(((y[1:] + y[:-1]) / 2).sum() / (len(y) - 1))


# --- confidence -----------------------------------------------------------------------------


def average_drop(y: float | np.ndarray, o: float | np.ndarray) -> float | np.ndarray:
    """Per image: max(0, y - o) / y for the class probability y on the image and o on the
    masked image (scalars or arrays [B]); the caller averages over images."""
    y = np.asarray(y, dtype=np.float64)
    result = np.maximum(0.0, y - np.asarray(o, dtype=np.float64)) / np.maximum(y, 1e-12)
    return float(result) if result.ndim == 0 else result


def increase_in_confidence(y: float | np.ndarray, o: float | np.ndarray) -> bool | np.ndarray:
    """Per image: o > y (the masked image is more confident); the caller takes the rate."""
    result = np.asarray(o) > np.asarray(y)
    return bool(result) if result.ndim == 0 else result


# --- localisation on the photo's grid -----------------------------------------------------


def peak(cam: np.ndarray) -> tuple[int, int]:
    """(x, y) of the maximum of ``cam`` [H,W] (the first in raster order)."""
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(col), int(row)


def pointing_hit(cam: np.ndarray, boxes: Sequence[Box], tolerance: float = 0.0) -> bool:
    """Pointing game on ``cam`` [H0,W0] (the photo's grid): the peak pixel lies in a box
    (x0, y0, x1, y1), ends exclusive, grown by ``tolerance`` pixels on every side."""
    x, y = peak(cam)
    cx, cy = x + 0.5, y + 0.5  # the pixel's centre
    return any(x0 - tolerance <= cx <= x1 + tolerance and y0 - tolerance <= cy <= y1 + tolerance
               for x0, y0, x1, y1 in boxes)


def largest_region_box(cam: np.ndarray, threshold: float = DEFAULT_THRESHOLD
                       ) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), ends exclusive, of the largest 8-connected region of
    ``cam`` [H,W] >= ``threshold``; None when no pixel reaches it."""
    mask = (cam >= threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[best, :4])
    return x, y, x + w, y + h


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1), ends exclusive."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, width) * max(0.0, height)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def localisation_iou(cam: np.ndarray, boxes: Sequence[Box],
                     threshold: float = DEFAULT_THRESHOLD) -> float:
    """Best IoU between the box of the largest region of ``cam`` [H0,W0] >= ``threshold`` and
    the ground-truth ``boxes``; 0 when no pixel reaches the threshold or there is no box."""
    found = largest_region_box(cam, threshold)
    if found is None or not boxes:
        return 0.0
    return max(box_iou(found, box) for box in boxes)


# --- baseline ------------------------------------------------------------------------------


def layer_cell_sigma(input_size: tuple[int, int], grid: tuple[int, int]) -> float:
    """Half the size, in input pixels, of one cell of a layer's grid (h, w) on an input of
    (H, W): max(H / h, W / w) / 2. Used as the random baseline's blur, so the random map is
    as coarse as a CAM from that layer (16 px for a 7 x 7 grid on 224 x 224)."""
    return 0.5 * max(input_size[0] / grid[0], input_size[1] / grid[1])


def random_map(shape: tuple[int, int], seed: int, sigma: float | None = None) -> np.ndarray:
    """A smooth random map [H,W] float32 in [0,1]: uniform noise from ``seed``, Gaussian
    blur with std ``sigma`` pixels (default ``RANDOM_BLUR`` x max(H, W)), min-max
    normalised."""
    noise = np.random.default_rng(seed).random(shape, dtype=np.float32)
    if sigma is None:
        sigma = RANDOM_BLUR * max(shape)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma, sigmaY=sigma,
                              borderType=cv2.BORDER_REFLECT_101)
    smooth -= smooth.min()
    return (smooth / (smooth.max() + 1e-7)).astype(np.float32)
