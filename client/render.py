"""Pictures for people: the four-tile panel (original | heatmap | overlay | regions).

RGB uint8 in, RGB uint8 out. Layout, top to bottom: a title banner (label, class,
probability, method), a caption row naming the tiles, the tiles (each ``TILE_HEIGHT`` high,
the photo's aspect), and a legend row: the colour bar 0..1 under the heatmap and the
contour and box legend with the threshold under the regions. The part of the photo the
model's center crop cut off is shown as the photo dimmed to grey, not as the colormap's 0.
"""

from __future__ import annotations

import cv2
import numpy as np

from camserve.client.explanation import Explanation

TILE_HEIGHT = 256
BANNER = 28  # the title
CAPTION = 20  # the tiles' names
LEGEND = 30  # the colour bar and the contour/box legend
CAPTIONS = ("original", "heatmap", "overlay", "regions")
_CONTOUR = (0, 255, 0)
_BOX = (255, 255, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
# kept for callers of the old names
_TILE_HEIGHT, _BANNER = TILE_HEIGHT, BANNER


def seen_mask(explanation: Explanation) -> np.ndarray:
    """bool [H0,W0]: the part of the photo inside the model's center crop."""
    geometry = explanation.geometry
    (h0, w0), (hr, wr) = geometry.original, geometry.resized
    x0, y0, x1, y1 = geometry.crop
    mask = np.zeros((h0, w0), bool)
    mask[round(y0 * h0 / hr):round(y1 * h0 / hr), round(x0 * w0 / wr):round(x1 * w0 / wr)] = True
    return mask


def _dim(photo: np.ndarray) -> np.ndarray:
    """The photo as neutral grey, dimmed: what the model never saw."""
    grey = cv2.cvtColor(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return (grey // 3 + 85).astype(np.uint8)


def panel(photo: np.ndarray, explanation: Explanation, threshold: float = 0.6,
          fused: bool | None = None) -> np.ndarray:
    """Original, heatmap, overlay and thresholded regions side by side, with a title,
    captions and a legend (the layout in the module's docstring)."""
    fused = explanation.fused if fused is None else fused
    thickness = max(2, round(min(photo.shape[:2]) / 150))
    with_regions = photo.copy()
    outlines = [c.reshape(-1, 1, 2) for c in explanation.contours(threshold)]
    cv2.drawContours(with_regions, outlines, -1, _CONTOUR, thickness)
    for x0, y0, x1, y1 in explanation.boxes(threshold):
        cv2.rectangle(with_regions, (x0, y0), (x1 - 1, y1 - 1), _BOX, thickness)
    heatmap, overlay = explanation.heatmap(), explanation.overlay(photo)
    seen = seen_mask(explanation)
    if not seen.all():  # cut off by the crop: dimmed photo, not the colormap's deep blue
        dimmed = _dim(photo)
        heatmap[~seen] = dimmed[~seen]
        overlay[~seen] = dimmed[~seen]
    tiles = [photo, heatmap, overlay, with_regions]
    scale = TILE_HEIGHT / photo.shape[0]
    size = (max(1, round(photo.shape[1] * scale)), TILE_HEIGHT)
    row = np.concatenate([cv2.resize(t, size, interpolation=cv2.INTER_AREA) for t in tiles],
                         axis=1)
    tile_width = size[0]

    banner = np.full((BANNER, row.shape[1], 3), 255, np.uint8)
    if fused:
        caption = f"{explanation.label} (fused)"
    else:
        caption = f"{explanation.label}  class {explanation.class_index}"
        if explanation.probability is not None:
            caption += f"  p={explanation.probability:.3f}"
    caption += f"  | {explanation.method}"
    if explanation.is_flat:
        caption += "  | flat map"
    cv2.putText(banner, caption, (6, 20), _FONT, 0.55, (0, 0, 0), 1, cv2.LINE_AA)

    captions = np.full((CAPTION, row.shape[1], 3), 235, np.uint8)
    for index, name in enumerate(CAPTIONS):
        (width, _), _ = cv2.getTextSize(name, _FONT, 0.45, 1)
        x = index * tile_width + max(2, (tile_width - width) // 2)
        cv2.putText(captions, name, (x, 15), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)

    legend = np.full((LEGEND, row.shape[1], 3), 255, np.uint8)
    _colour_bar(legend, tile_width, tile_width)
    _regions_legend(legend, 3 * tile_width, tile_width, threshold, thickness=2)
    return np.concatenate([banner, captions, row, legend], axis=0)


def _colour_bar(legend: np.ndarray, x: int, width: int) -> None:
    """The jet colour bar 0..1 into ``legend`` at column ``x``, ``width`` wide."""
    left, right = x + 14, x + width - 14
    if right - left < 8:
        return
    ramp = np.linspace(0, 255, right - left).astype(np.uint8)[None, :]
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    legend[4:14, left:right] = bar[0]
    cv2.putText(legend, "0", (left - 10, 26), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(legend, "1", (right + 2, 26), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)


def _regions_legend(legend: np.ndarray, x: int, width: int, threshold: float,
                    thickness: int) -> None:
    """'-- contour  [] box  at >= T' into ``legend`` at column ``x``."""
    y = LEGEND // 2
    cv2.line(legend, (x + 6, y), (x + 22, y), _CONTOUR, thickness)
    cv2.putText(legend, "contour", (x + 26, y + 5), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(legend, (x + 86, y - 6), (x + 100, y + 6), _BOX, thickness)
    cv2.putText(legend, f"box  map >= {threshold:g}", (x + 104, y + 5), _FONT, 0.4,
                (0, 0, 0), 1, cv2.LINE_AA)
