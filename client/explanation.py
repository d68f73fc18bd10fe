"""``Explanation``: one target's map, mapped onto the photo, and what to draw or measure.

Masks, contours, boxes and regions come from ``camserve.explain.regions``, the code the
server runs for ``OutputOptions.regions``: on the same response both find the same regions.

Channel order: every image that goes in or comes out of this module is RGB uint8 [H,W,3].
(OpenCV's colormaps produce BGR; we convert.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from camserve import tensors
from camserve.errors import CallerError
from camserve.explain.geometry import Geometry, resize_map, to_original
from camserve.explain.methods import DEFAULT_METHOD
from camserve.explain.regions import DEFAULT_THRESHOLD, Region, find_regions, threshold_mask

if TYPE_CHECKING:  # typing only: the pipeline module is not needed to draw a map
    from camserve.explain.pipeline import Explained, Target

FLAT_MAP_RANGE = 1e-3  # max - min of a [0, 1] map below this: ``is_flat``
FLAT_MAP_HINT = ("the map is flat (nearly constant): this method or layer does not localise "
                 "on this model; try another layer (--layer / layers=) or method")
_COLORMAPS = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO,
              "inferno": cv2.COLORMAP_INFERNO, "viridis": cv2.COLORMAP_VIRIDIS,
              "hot": cv2.COLORMAP_HOT}
_NO_MAP = ("the response had no map (space \"none\" sends regions only): ask for space "
           "\"model_input\" to draw or measure the map")


@dataclass(frozen=True)
class ServerTimings:
    """What the server spent on the request, by stage, in ms (the response's ``Timings``):
    decoding the image, preprocessing it to the model input, the graph run (including any
    wait in the batching queue) and the maps. The rest of a call's time is gRPC, the
    network and the SDK."""

    decode_ms: float
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float

    @classmethod
    def from_us(cls, decode_us: int, preprocess_us: int, inference_us: int,
                postprocess_us: int) -> ServerTimings:
        return cls(decode_us / 1e3, preprocess_us / 1e3, inference_us / 1e3,
                   postprocess_us / 1e3)

    @property
    def total_ms(self) -> float:
        return self.decode_ms + self.preprocess_ms + self.inference_ms + self.postprocess_ms


@dataclass(frozen=True)
class Explanation:
    """One target of one image.

    ``cam_input`` is float32 [H,W] in [0,1] at the model's input size; ``cam`` is the same
    map on the original photo's pixel grid [H0,W0] (zero where the center crop cut the photo).
    A response with space "none" (CamSpace NO_MAP) has no map: ``cam_input`` is None and
    everything drawn or measured from the map raises a CallerError. ``server_regions`` are
    the regions the server computed (``regions=True``), in photo pixels, largest peak first.
    ``server_timings`` says where the server's time went (None where no server answered).

    A ``fuse`` result has ``class_indices`` of all its parts (``class_index`` is the first
    part's), a label "a + b", and no ``logit`` or ``probability`` (None): those belong to one
    class. ``is_flat`` says the map carries no localisation (constant: try another layer or
    method).
    """

    class_index: int
    label: str
    logit: float | None
    probability: float | None
    cam_input: np.ndarray | None
    geometry: Geometry
    request_id: str = ""
    model: str = ""
    method: str = DEFAULT_METHOD
    server_regions: tuple[Region, ...] = ()
    class_indices: tuple[int, ...] = ()  # a fused map's classes; () means (class_index,)
    server_timings: ServerTimings | None = None  # the request's, shared by its targets

    def __post_init__(self) -> None:
        if not self.class_indices:
            object.__setattr__(self, "class_indices", (int(self.class_index),))

    @property
    def fused(self) -> bool:
        """A ``fuse`` of several explanations."""
        return len(self.class_indices) > 1

    @property
    def is_flat(self) -> bool:
        """The map is (nearly) constant: it points nowhere. Common for methods or layers that
        do not suit a model (e.g. scorecam on a late, low-resolution layer): try another
        ``layers=`` or ``method=``. False without a map."""
        if self.cam_input is None or self.cam_input.size == 0:
            return False
        return float(np.ptp(self.cam_input)) < FLAT_MAP_RANGE

    @property
    def cam(self) -> np.ndarray:
        if self.cam_input is None:
            raise CallerError(_NO_MAP)
        return to_original(self.cam_input, self.geometry)

    def heatmap(self, colormap: str = "jet") -> np.ndarray:
        """The map as a colour image, RGB uint8 [H0,W0,3]."""
        if colormap not in _COLORMAPS:
            raise ValueError(f"unknown colormap {colormap!r}; choose one of: "
                             f"{', '.join(_COLORMAPS)}")
        scaled = tensors.to_levels(self.cam)
        return cv2.cvtColor(cv2.applyColorMap(scaled, _COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)

    def overlay(self, image: np.ndarray, alpha: float = 0.5,
                colormap: str = "jet") -> np.ndarray:
        """Blend the heatmap onto ``image`` (RGB uint8 [H0,W0,3], the photo that was sent).

        Returns RGB uint8 of the photo's size: (1 - alpha) * photo + alpha * heatmap.
        """
        image = _rgb(image)
        if image.shape[:2] != self.geometry.original:
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but the explained "
                             f"photo was {self.geometry.original[1]}x{self.geometry.original[0]}")
        return cv2.addWeighted(image, 1.0 - alpha, self.heatmap(colormap), alpha, 0.0)

    def mask(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """bool [H0,W0]: where the map is at least ``threshold``."""
        return threshold_mask(self.cam, threshold)

    def regions(self, threshold: float = DEFAULT_THRESHOLD, max_regions: int | None = None,
                min_area: float = 0.0) -> list[Region]:
        """The map's regions at ``threshold`` in photo pixels, largest peak first: what the
        server sends for ``regions=True`` with the same options (``find_regions``)."""
        return find_regions(self.cam, threshold, max_regions, min_area)

    def contours(self, threshold: float = DEFAULT_THRESHOLD) -> list[np.ndarray]:
        """Outlines of the thresholded regions: int32 [N,2] (x, y) in photo pixels, largest
        peak first."""
        return [r.polygon for r in self.regions(threshold)]

    def boxes(self, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int, int, int]]:
        """(x0, y0, x1, y1) per thresholded region, x1/y1 exclusive, in photo pixels, largest
        peak first (the bounding boxes of ``contours``)."""
        return [r.box for r in self.regions(threshold)]

    def to_dict(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
        """JSON-safe summary: class, scores, and the regions at ``threshold`` (without a map:
        the server's regions, and ``threshold`` None)."""
        if self.cam_input is None:
            regions, threshold = list(self.server_regions), None
        else:
            regions = self.regions(threshold)
        return {
            "class_index": int(self.class_index), "label": self.label,
            "class_indices": [int(c) for c in self.class_indices], "fused": self.fused,
            "logit": None if self.logit is None else float(self.logit),
            "probability": None if self.probability is None else float(self.probability),
            "flat": self.is_flat,
            "model": self.model, "method": self.method, "request_id": self.request_id,
            "threshold": threshold,
            "boxes": [list(r.box) for r in regions],
            "contours": [r.polygon.tolist() for r in regions],
            "image_size": [self.geometry.original[1], self.geometry.original[0]],
        }


def explanations_from(explained: Explained, request_id: str = "") -> list[Explanation]:
    """The Explanations of a pipeline result (``Pipeline.explain``, as the Triton path runs it
    in this process), one per target."""
    return from_targets(explained.targets, explained.geometry, model=explained.model,
                        method=explained.method, request_id=request_id)


def from_targets(targets: Iterable[Target], geometry: Geometry, *, model: str, method: str,
                 request_id: str = "", timings: ServerTimings | None = None
                 ) -> list[Explanation]:
    """One Explanation per target, its ``cam`` float32 [h,w] in [0, 1] (unless raw) at the
    model's input size [H,W] or on a layer's grid, which is upsampled to the crop here (None,
    for CamSpace NO_MAP, stays None); the target's regions become ``server_regions``.

    The one place an Explanation is built from an answer: ``explanations`` (a gRPC response)
    and ``explanations_from`` (a pipeline result) both end here, so they cannot drift apart.
    """
    x0, y0, x1, y1 = geometry.crop
    return [Explanation(t.class_index, t.label, t.logit, t.probability,
                        None if t.cam is None else resize_map(t.cam, y1 - y0, x1 - x0),
                        geometry, request_id, model, method, tuple(t.regions),
                        server_timings=timings)
            for t in targets]


def fuse(explanations: Sequence[Explanation], how: str = "max") -> Explanation:
    """One map for several targets of the same image: element-wise max (or mean).

    The result says it is fused: ``class_indices`` lists every part's class (``class_index``
    is the first's), the label joins all labels ("a + b"), ``logit`` and ``probability`` are
    None (they belong to one class, not to the fused map).
    """
    if not explanations:
        raise ValueError("fuse needs at least one explanation")
    geometry = explanations[0].geometry
    if any(e.geometry != geometry for e in explanations):
        raise ValueError("fuse needs explanations of the same image")
    if any(e.cam_input is None for e in explanations):
        raise CallerError(_NO_MAP)
    maps = np.stack([e.cam_input for e in explanations])
    if how == "max":
        fused = maps.max(axis=0)
    elif how == "mean":
        fused = maps.mean(axis=0)
    else:
        raise ValueError(f"unknown fusion {how!r}; choose max or mean")
    first = explanations[0]
    classes = tuple(c for e in explanations for c in e.class_indices)
    return Explanation(first.class_index, " + ".join(e.label for e in explanations), None,
                       None, fused.astype(np.float32), geometry, first.request_id, first.model,
                       first.method, class_indices=classes, server_timings=first.server_timings)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 [H,W,3] image, got {image.dtype} "
                         f"{list(image.shape)}")
    return image
