"""Request images -> the explainer's ``image`` input [1,3,H,W], with OpenCV and NumPy.

Header sniffing first: a 48 KB PNG can declare 20000 x 20000 pixels (1.2 GB decoded), so the
size a file's header declares is checked against the limit before anything is decoded (PNG,
JPEG, BMP and WebP are recognised: the formats the service accepts). Then encoded files are
decoded with OpenCV (grayscale, 16-bit and alpha images become 8-bit RGB), resized so the
shorter side is ``resize`` (bilinear), center-cropped, scaled and normalised per
``Preprocessing``.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from camserve.contract import Preprocessing
from camserve.errors import CallerError, LimitError
from camserve.explain.geometry import Geometry

FORMATS = "JPEG, PNG, WebP or BMP"


def declared_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from the header, or None when the bytes are none of the four
    formats or the header is cut short."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return "PNG", width, height
        if data.startswith(b"\xff\xd8"):
            return _jpeg(data)
        if data.startswith(b"BM"):
            return _bmp(data)
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            return _webp(data)
    except struct.error:
        return None
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes) -> tuple[str, int, int] | None:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            offset += 2
            continue
        (length,) = struct.unpack(">H", data[offset + 2:offset + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[offset + 5:offset + 9])
            return "JPEG", width, height
        offset += 2 + length
    return None


def _bmp(data: bytes) -> tuple[str, int, int]:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:
        width, height = struct.unpack("<hh", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return "BMP", abs(width), abs(height)


def _webp(data: bytes) -> tuple[str, int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return "WebP", width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        (bits,) = struct.unpack("<I", data[21:25])
        return "WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return "WebP", width, height
    return None


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG's end-of-image marker follows its frame header (a cut-off stream
    would otherwise decode into a partly grey picture)."""
    end = data.rfind(b"\xff\xd9")
    return end > 2 and end > data.find(b"\xff\xc0", 2) and end > data.find(b"\xff\xc2", 2)


DEFAULT_MAX_PIXELS = 36_000_000  # 6000 x 6000; about 108 MB decoded


class ImageError(CallerError):
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
