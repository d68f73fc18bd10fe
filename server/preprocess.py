"""Request images -> the explainer's ``image`` input [1,3,H,W], with OpenCV and NumPy.

Encoded files are decoded with OpenCV (JPEG, PNG, WebP, BMP; grayscale, 16-bit and alpha
images are converted to 8-bit RGB), resized so the shorter side is ``resize`` (bilinear),
center-cropped, scaled and normalised per ``Preprocessing``.
"""

from __future__ import annotations

import cv2
import numpy as np

from camserve.contract import Preprocessing
from camserve.errors import CamserveError, LimitError
from camserve.geometry import Geometry
from camserve.server.imageheader import FORMATS, declared_size, jpeg_is_complete

DEFAULT_MAX_PIXELS = 36_000_000  # 6000 x 6000; about 108 MB decoded


class ImageError(CamserveError):
    """An image that cannot be decoded or has the wrong layout."""


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [H,W,3].

    The size the header declares is checked against ``max_pixels`` before decoding.
    """
    if not data:
        raise ImageError(f"the encoded image is empty; send {FORMATS} bytes")
    header = declared_size(data)
    if header is None:
        raise ImageError(f"the encoded image is not a {FORMATS} file (or its header is cut "
                         f"short; {len(data)} bytes)")
    kind, width, height = header
    if width * height > max_pixels:
        raise LimitError(f"the {kind} declares {width}x{height} pixels; the limit is "
                         f"{max_pixels} pixels")
    if width == 0 or height == 0:
        raise ImageError(f"the {kind} declares an empty {width}x{height} image")
    if kind == "JPEG" and not jpeg_is_complete(data):
        raise ImageError(f"the JPEG is cut short ({len(data)} bytes, no end-of-image marker)")
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageError(f"cannot decode the image: {str(exc).strip().splitlines()[-1]}") from exc
    if bgr is None:
        raise ImageError(f"cannot decode the {kind} image ({len(data)} bytes): the file is "
                         "damaged or cut short")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def from_pixels(height: int, width: int, pixels: bytes,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Raw uint8 RGB bytes -> [H,W,3] view (no copy)."""
    if height <= 0 or width <= 0:
        raise ImageError(f"raw image size {height}x{width} is empty")
    if height * width > max_pixels:
        raise LimitError(f"the raw image has {width}x{height} pixels; the limit is "
                         f"{max_pixels} pixels")
    expected = height * width * 3
    if len(pixels) != expected:
        raise ImageError(f"raw image of {height}x{width}x3 uint8 needs {expected} bytes, "
                         f"got {len(pixels)}")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3)


def preprocess(rgb: np.ndarray, spec: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """uint8 RGB [H0,W0,3] -> float32 [1,3,H,W] model input, and how it maps back."""
    height, width = rgb.shape[:2]
    geometry = Geometry.for_image(height, width, spec.resize, spec.crop)
    resized = cv2.resize(rgb, (geometry.resized[1], geometry.resized[0]),
                         interpolation=cv2.INTER_LINEAR if spec.interpolation != "bicubic"
                         else cv2.INTER_CUBIC)
    x0, y0, x1, y1 = geometry.crop
    crop = resized[y0:y1, x0:x1]
    mean = np.asarray(spec.mean, np.float32) / np.float32(spec.scale)
    inv_std = np.float32(spec.scale) / np.asarray(spec.std, np.float32)
    # (x * scale - mean) / std == (x - mean / scale) * (scale / std), one pass per channel
    tensor = np.empty((1, 3, y1 - y0, x1 - x0), dtype=np.float32)
    for c in range(3):
        np.multiply(np.subtract(crop[:, :, c], mean[c], dtype=np.float32), inv_std[c],
                    out=tensor[0, c])
    return tensor, geometry
