"""Regions of a map: the connected areas at or above a threshold, as polygons and boxes.

One implementation for both ends: the server answers ``OutputOptions.regions`` with it
(``Pipeline.finish``) and the SDK's ``Explanation.mask``, ``contours``, ``boxes`` and
``regions`` call it, so a region found on the server is the region the SDK finds in the
same response's map.

    cam [H0,W0] --(cam >= threshold)--> mask --findContours(RETR_EXTERNAL, SIMPLE)-->
    one Region per outer contour: polygon, box, area, peak; largest peak first

The polygon is the contour simplified to within ``POLYGON_TOLERANCE`` pixels
(Douglas-Peucker, ``cv2.approxPolyDP``): a curved outline keeps a vertex on nearly every
boundary pixel otherwise, and those vertices were most of a regions-only response's bytes
(4.2 KB -> 1.2 KB on the tiny test model). Box, area and peak come from the full contour.

Units: pixels of the map's grid (the original photo's, for a map from
``geometry.to_original``); polygons and boxes are (x, y) = (column, row).

**Area** is ``cv2.contourArea`` of the polygon, whose vertices are the centres of the
region's boundary pixels: a filled w x h rectangle of pixels has area (w - 1) * (h - 1),
and a single pixel (or a one-pixel-wide line) has area 0. ``min_area`` compares with that
same number: a region is kept when ``area >= min_area``, so ``min_area=0`` keeps every
region, single pixels included, and any ``min_area > 0`` drops single pixels and lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from camserve.errors import CallerError
from camserve.v1 import explainer_pb2 as pb

DEFAULT_THRESHOLD = 0.6  # the source article's level (chest X-rays)
DEFAULT_MAX_REGIONS = 16  # per target, on the wire
POLYGON_TOLERANCE = 1.0  # pixels a simplified polygon may depart from the region's outline


@dataclass(frozen=True)
class Region:
    """One outer contour of a thresholded map.

    ``polygon`` int32 [P,2] (x, y) in map pixels: the outline within ``POLYGON_TOLERANCE``;
    ``box`` (x0, y0, x1, y1), x0/y0 inclusive, x1/y1 exclusive: the polygon's bounding box;
    ``area`` the polygon's area in pixels (see the module's note: 0 for a single pixel);
    ``peak`` the map's highest value inside the polygon.
    """

    polygon: np.ndarray
    box: tuple[int, int, int, int]
    area: float
    peak: float


def threshold_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """bool [H,W]: where ``cam`` [H,W] is at least ``threshold`` (NaN is never)."""
    return np.asarray(cam) >= threshold


def find_regions(cam: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                 max_regions: int | None = None, min_area: float = 0.0) -> list[Region]:
    """The regions of ``cam`` (float [H,W]) at or above ``threshold``: one per outer contour
    of the mask, with ``area >= min_area``, ordered by peak (largest first; ties: larger
    area, then top-most, then left-most), at most ``max_regions`` (None: all)."""
    cam = np.asarray(cam)
    mask = threshold_mask(cam, threshold).astype(np.uint8)
    found, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    regions = []
    for contour in found:
        area = float(cv2.contourArea(contour))
        if area < min_area:
            continue
        x, y, w, h = cv2.boundingRect(contour)
        polygon = cv2.approxPolyDP(contour, POLYGON_TOLERANCE, True)
        regions.append(Region(polygon.reshape(-1, 2).astype(np.int32), (x, y, x + w, y + h),
                              area, _peak(cam, contour, x, y, w, h)))
    regions.sort(key=lambda r: (-r.peak, -r.area, r.box[1], r.box[0]))
    return regions if max_regions is None else regions[:max_regions]


def _peak(cam: np.ndarray, contour: np.ndarray, x: int, y: int, w: int, h: int) -> float:
    """The map's maximum inside the filled contour, drawn only within its bounding box (so
    the cost is the region's box, not the whole map)."""
    inside = np.zeros((h, w), np.uint8)
    cv2.drawContours(inside, [contour], 0, 1, thickness=cv2.FILLED, offset=(-x, -y))
    return float(np.fmax.reduce(cam[y:y + h, x:x + w][inside.astype(bool)]))  # NaN-blind


@dataclass(frozen=True)
class RegionQuery:
    """``OutputOptions.regions`` with its defaults applied and checked."""

    threshold: float
    max_regions: int
    min_area: float  # original-image pixels, compared with ``Region.area``


def region_query(request: pb.ExplainRequest, limit: int) -> RegionQuery | None:
    """``output.regions`` of a request checked, its zeros replaced by the defaults (None: not
    asked for); ``limit`` is the server's most regions per target."""
    options = request.output.regions
    if not options.enabled:
        return None
    threshold = options.threshold or DEFAULT_THRESHOLD
    if not (np.isfinite(threshold) and 0 < threshold <= 1):
        raise CallerError(f"output.regions.threshold is a map level in (0, 1] (0: "
                          f"{DEFAULT_THRESHOLD}), got {options.threshold}")
    max_regions = options.max_regions or DEFAULT_MAX_REGIONS
    if max_regions > limit:
        raise CallerError(f"output.regions.max_regions must be at most "
                          f"{limit} (0: {DEFAULT_MAX_REGIONS}), got "
                          f"{options.max_regions}")
    if not (np.isfinite(options.min_area) and options.min_area >= 0):
        raise CallerError(f"output.regions.min_area is a number of original-image pixels "
                          f">= 0, got {options.min_area}")
    if request.raw_maps:
        raise CallerError("output.regions threshold maps normalised to [0, 1]: unset "
                          "raw_maps")
    return RegionQuery(float(threshold), max_regions, float(options.min_area))
