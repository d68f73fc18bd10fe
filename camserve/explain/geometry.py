"""Where the model's input came from in the photo, and how to map a map back onto it.

Preprocessing resizes the photo (shorter side to ``resize``) and center-crops it to the
model's H x W. ``Geometry`` records both steps; ``to_original`` undoes them for a map at
model-input size, so a heatmap lines up with the photo it explains.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Geometry:
    """original (H0, W0) -> resized (Hr, Wr) -> crop box (x0, y0, x1, y1) in resized pixels."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]

    @classmethod
    def for_image(cls, height: int, width: int, resize: int,
                  crop: tuple[int, int]) -> "Geometry":
        """torchvision's Resize(resize) + CenterCrop(crop) on a height x width image."""
        if width <= height:
            resized = (int(resize * height / width), resize)
        else:
            resized = (resize, int(resize * width / height))
        resized = (max(resized[0], crop[0]), max(resized[1], crop[1]))
        top = int(round((resized[0] - crop[0]) / 2.0))
        left = int(round((resized[1] - crop[1]) / 2.0))
        return cls((height, width), resized, (left, top, left + crop[1], top + crop[0]))

    @classmethod
    def identity(cls, height: int, width: int) -> "Geometry":
        return cls((height, width), (height, width), (0, 0, width, height))


def resize_map(cam: np.ndarray, height: int, width: int,
               out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resize of a 2-D float32 map to height x width (OpenCV, as grad-cam does);
    into ``out`` (C-contiguous float32 [height, width]) when given."""
    if cam.shape == (height, width):
        if out is None:
            return cam.astype(np.float32, copy=False)
        out[...] = cam
        return out
    return cv2.resize(np.ascontiguousarray(cam, dtype=np.float32), (width, height), dst=out,
                      interpolation=cv2.INTER_LINEAR)


def to_original(cam_input: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A map at model-input size [H, W] -> the original photo's grid [H0, W0].

    The map goes back into its crop box of the resized image (zero where the model saw
    nothing), then the resized image is scaled to the original size.
    """
    x0, y0, x1, y1 = geometry.crop
    canvas = np.zeros(geometry.resized, dtype=np.float32)
    canvas[y0:y1, x0:x1] = resize_map(cam_input, y1 - y0, x1 - x0)
    return resize_map(canvas, *geometry.original)
