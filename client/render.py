"""Pictures for people: the four-tile panel (original | heatmap | overlay | contours).

RGB uint8 in, RGB uint8 out.
"""

from __future__ import annotations

import cv2
import numpy as np

from camserve.client.explanation import Explanation

_TILE_HEIGHT = 256
_BANNER = 28


def panel(photo: np.ndarray, explanation: Explanation, threshold: float = 0.6,
          fused: bool = False) -> np.ndarray:
    """Original, heatmap, overlay and thresholded contours side by side, with a caption."""
    with_contours = photo.copy()
    outlines = [c.reshape(-1, 1, 2) for c in explanation.contours(threshold)]
    thickness = max(2, round(min(photo.shape[:2]) / 150))
    cv2.drawContours(with_contours, outlines, -1, (0, 255, 0), thickness)
    for x0, y0, x1, y1 in explanation.boxes(threshold):
        cv2.rectangle(with_contours, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 0), thickness)
    tiles = [photo, explanation.heatmap(), explanation.overlay(photo), with_contours]
    scale = _TILE_HEIGHT / photo.shape[0]
    size = (max(1, round(photo.shape[1] * scale)), _TILE_HEIGHT)
    row = np.concatenate([cv2.resize(t, size, interpolation=cv2.INTER_AREA) for t in tiles],
                         axis=1)
    banner = np.full((_BANNER, row.shape[1], 3), 255, np.uint8)
    caption = (f"{explanation.label} (fused)" if fused else
               f"{explanation.label}  class {explanation.class_index}  "
               f"p={explanation.probability:.3f}")
    caption += f"  | {explanation.method}  contours at {threshold:g}"
    cv2.putText(banner, caption, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.concatenate([banner, row], axis=0)
