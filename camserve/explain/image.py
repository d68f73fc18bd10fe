"""Request images -> the explainer's ``image`` input [1,3,H,W], with OpenCV and NumPy.

Header sniffing first: a 48 KB PNG can declare 20000 x 20000 pixels (1.2 GB decoded), so the
size a file's header declares is checked against the limit before anything is decoded (PNG,
JPEG, BMP and WebP are recognised: the formats the service accepts). Then encoded files are
decoded with OpenCV (grayscale and alpha images become 8-bit RGB); a large JPEG is
decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling) when that keeps its shorter
side at least twice the model's ``resize`` (``decode_for``). A 16-bit PNG (X-ray and other
medical exports) is decoded at full depth and windowed to 8 bits (``Window``, ``to_8bit``):
by default over its own min..max, or over a window the request names. Preprocessing resizes as torchvision's ``Resize(resize)`` does on a
PIL image (PIL's separable filters, antialiased when shrinking; only the pixels the crop needs
are resampled), then center-crops, scales and normalises per ``Preprocessing``.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import cv2
import numpy as np

from camserve.contract import Preprocessing
from camserve.errors import CallerError, LimitError
from camserve.explain.geometry import Geometry

FORMATS = "JPEG, PNG, WebP or BMP"


def declared_size(data: bytes | memoryview) -> tuple[str, int, int] | None:
    """(format, width, height) from the header, or None when the bytes are none of the four
    formats or the header is cut short."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return "PNG", width, height
        if data[:2] == b"\xff\xd8":
            return _jpeg(data)
        if data[:2] == b"BM":
            return _bmp(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
    except struct.error:
        return None
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_frame_header(data: bytes | memoryview) -> int | None:
    """The offset of a JPEG's frame header (its SOF marker), found by walking the segments
    from the start: a thumbnail inside an APP segment is stepped over. None if there is no
    such marker where one must be."""
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
        if marker in _SOF:
            return offset
        (length,) = struct.unpack(">H", data[offset + 2:offset + 4])
        offset += 2 + length
    return None


def _jpeg(data: bytes | memoryview) -> tuple[str, int, int] | None:
    offset = _jpeg_frame_header(data)
    if offset is None:
        return None
    height, width = struct.unpack(">HH", data[offset + 5:offset + 9])
    return "JPEG", width, height


def _bmp(data: bytes | memoryview) -> tuple[str, int, int]:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:
        width, height = struct.unpack("<hh", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return "BMP", abs(width), abs(height)


def _webp(data: bytes | memoryview) -> tuple[str, int, int] | None:
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


def jpeg_is_complete(data: bytes | memoryview) -> bool:
    """Whether a JPEG's end-of-image marker follows its frame header (a cut-off stream
    would otherwise decode into a partly grey picture; an EXIF thumbnail's own end marker
    comes before the frame header). A complete file ends with the marker, so the search
    from the end stops at once; the header is found by walking the segments, not by
    searching the whole file for its marker (3 ms for a 3 MB 4K JPEG)."""
    header = _jpeg_frame_header(data)
    if header is None:
        return False
    if data[-2:] == b"\xff\xd9":
        return len(data) - 2 > header
    return bytes(data).rfind(b"\xff\xd9") > header  # bytes after the marker: rare


DEFAULT_MAX_PIXELS = 36_000_000  # 6000 x 6000; about 108 MB decoded


class ImageError(CallerError):
    """An image that cannot be decoded or has the wrong layout."""


@dataclass(frozen=True)
class Window:
    """A linear intensity window in the image's own units (0..65535 for a 16-bit PNG,
    0..255 for 8 bits): [center - width/2, center + width/2] maps onto 0..255.

    A DICOM-style window/level: v8 = floor(clip((v - lower) / width, 0, 1) * 255 + 0.5) with
    lower = center - width / 2; values below the window are 0, above it 255.
    """

    center: float
    width: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.center) and np.isfinite(self.width) and self.width > 0):
            raise ImageError(f"an intensity window needs a finite center and a width > 0, got "
                             f"center {self.center} and width {self.width}")

    @classmethod
    def min_max(cls, samples: np.ndarray) -> Window | None:
        """The window spanning ``samples``' own min..max; None for a constant image (which
        ``to_8bit`` makes all 0)."""
        low, high = float(samples.min()), float(samples.max())
        return cls((low + high) / 2, high - low) if high > low else None


def to_8bit(samples: np.ndarray, window: Window | None) -> np.ndarray:
    """uint8 or uint16 samples [H,W] or [H,W,C] -> uint8 of the same shape through
    ``window`` (None: all 0, a constant image's min..max).

    ``Window``'s formula in float64 for each of the 256 or 65536 possible levels, then one
    table lookup per sample: exact, and no float copy of a large image."""
    if samples.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"cannot window {samples.dtype} samples; 8- and 16-bit images only")
    if window is None:
        return np.zeros(samples.shape, np.uint8)
    levels = np.arange(np.iinfo(samples.dtype).max + 1, dtype=np.float64)
    lower = window.center - window.width / 2
    table = np.floor(np.clip((levels - lower) / window.width, 0, 1) * 255 + 0.5)
    return table.astype(np.uint8)[samples]


@dataclass(frozen=True)
class Decoded:
    """A decoded photo: ``rgb`` uint8 [h,w,3] showing an ``original`` (H0, W0) photo.

    A JPEG decoded at 1/``factor`` (2, 4 or 8, a divisor of H0 and W0) has h, w = H0/f, W0/f;
    its pixel i covers original pixels [i*f, (i+1)*f). ``factor`` 1: full size.
    """

    rgb: np.ndarray
    original: tuple[int, int]
    factor: int = 1


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
           window: Window | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [H,W,3] at full size (``decode_for``'s windowing).

    The size the header declares is checked against ``max_pixels`` before decoding.
    """
    return decode_for(data, 0, max_pixels, window).rgb


def decode_for(data: bytes | memoryview, shorter_side: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               window: Window | None = None) -> Decoded:
    """Encoded image bytes -> ``Decoded`` for a model that resizes to ``shorter_side``.

    A JPEG is decoded at the largest 1/f (f = 8, 4, 2) that divides its height and width and
    keeps its shorter side min(H0,W0)/f >= ``HEADROOM * shorter_side``; other formats (and
    ``shorter_side`` 0) at full size.
    Intensities: with a ``window``, every format's samples go through it (``to_8bit``, at
    full size); without one, a 16-bit PNG is windowed over its own min..max
    (``Window.min_max``) and 8-bit images are used as they are.
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
    if window is not None or (kind == "PNG" and data[24:25] == b"\x10"):  # IHDR: depth
        samples = _imdecode(data, kind, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        rgb = to_8bit(samples, window if window is not None else Window.min_max(samples))
        if rgb.ndim == 2:
            rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB)
        return Decoded(rgb, rgb.shape[:2])
    factor = next((f for f in (8, 4, 2) if kind == "JPEG" and shorter_side > 0
                   and width % f == 0 and height % f == 0
                   and min(width, height) // f >= HEADROOM * shorter_side), 1)
    rgb = _imdecode(data, kind, _REDUCED[factor])
    if factor > 1:
        # OpenCV applies EXIF orientation, which may swap the declared width and height
        for h0, w0 in ((height, width), (width, height)):
            if rgb.shape[:2] == (h0 // factor, w0 // factor):
                return Decoded(rgb, (h0, w0), factor)
        rgb = _imdecode(data, kind, _REDUCED[1])  # a size we cannot place: full size
    return Decoded(rgb, rgb.shape[:2])


# DCT scaling is not PIL's filter: on 1080p/4K frames, decoding down to just ``resize`` moved
# the model input by up to 0.15 (normalised, std 0.5) from torchvision on the full decode;
# keeping twice ``resize`` moved it by 0.04 and still decodes 4-16x fewer pixels. libjpeg
# rounds a reduced size up (ceil(N/f)): the last pixel covers a part block, at the end of the
# axis or, after an EXIF flip or rotation, at its start, so f must divide both sides.
HEADROOM = 2
# decoded straight to RGB (the decoder writes RGB: no conversion pass after it); the reduced
# flags' colour bit is IMREAD_COLOR (BGR), which IMREAD_COLOR_RGB replaces
_REDUCED = {factor: flag & ~cv2.IMREAD_COLOR | cv2.IMREAD_COLOR_RGB for factor, flag in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
    (8, cv2.IMREAD_REDUCED_COLOR_8))}


def _imdecode(data: bytes, kind: str, flag: int) -> np.ndarray:
    """OpenCV's decode with ``flag``, in RGB order (gray [H,W] stays gray; without
    IMREAD_COLOR_RGB in ``flag``, colour comes from OpenCV as BGR and is converted)."""
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error as exc:
        raise ImageError(f"cannot decode the image: {str(exc).strip().splitlines()[-1]}") from exc
    if bgr is None:
        raise ImageError(f"cannot decode the {kind} image ({len(data)} bytes): the file is "
                         "damaged or cut short")
    if bgr.ndim == 2 or flag & cv2.IMREAD_COLOR_RGB:
        return bgr
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def preprocess(photo: np.ndarray | Decoded, spec: Preprocessing
               ) -> tuple[np.ndarray, Geometry]:
    """uint8 RGB [H0,W0,3] (or a ``Decoded`` photo) -> float32 [1,3,H,W] model input, and
    how it maps back onto the original H0 x W0 photo.

    As torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on a PIL image, in float32
    (PIL rounds to uint8 between and after its two passes: within one level of it).
    """
    if not isinstance(photo, Decoded):
        photo = Decoded(photo, photo.shape[:2])
    geometry = Geometry.for_image(*photo.original, spec.resize, spec.crop)
    x0, y0, x1, y1 = geometry.crop
    kind = "bicubic" if spec.interpolation == "bicubic" else "bilinear"
    # input pixels per output pixel, on each axis, in the decoded photo's pixels
    scale_y = photo.original[0] / geometry.resized[0] / photo.factor
    scale_x = photo.original[1] / geometry.resized[1] / photo.factor
    crop = _resample(photo.rgb, _taps(photo.rgb.shape[0], scale_y, y0, y1, kind),
                     _taps(photo.rgb.shape[1], scale_x, x0, x1, kind), kind == "bicubic")
    mean = np.asarray(spec.mean, np.float32) / np.float32(spec.scale)
    inv_std = np.float32(spec.scale) / np.asarray(spec.std, np.float32)
    # (x * scale - mean) / std == (x - mean / scale) * (scale / std), one pass per channel
    if spec.channels == 1:  # one-channel model: luma, as PIL's convert("L") (contract.py)
        crop = (np.float32(0.299) * crop[0] + np.float32(0.587) * crop[1]
                + np.float32(0.114) * crop[2])[None]
    tensor = np.empty((1, len(crop), y1 - y0, x1 - x0), dtype=np.float32)
    for c in range(len(crop)):
        np.multiply(np.subtract(crop[c], mean[c]), inv_std[c], out=tensor[0, c])
    return tensor, geometry


def resample(photo: np.ndarray | Decoded, height: int, width: int,
             interpolation: str = "bilinear") -> np.ndarray:
    """uint8 RGB [h,w,3] (or a ``Decoded`` photo) -> uint8 RGB [height, width, 3]: the whole
    original photo resampled as ``preprocess`` resamples it (PIL's filters, antialiased when
    shrinking; "bicubic" or else bilinear), rounded to the nearest level as PIL rounds.

    What a client sends instead of a camera-sized frame (the SDK's ``resize_on_client``):
    at ``Geometry.for_image(...).resized`` the server's own resampling of it is the
    identity, so the model input differs from one-step preprocessing by rounding only.
    """
    if not isinstance(photo, Decoded):
        photo = Decoded(photo, photo.shape[:2])
    kind = "bicubic" if interpolation == "bicubic" else "bilinear"
    scale_y = photo.original[0] / height / photo.factor
    scale_x = photo.original[1] / width / photo.factor
    planes = _resample(photo.rgb, _taps(photo.rgb.shape[0], scale_y, 0, height, kind),
                       _taps(photo.rgb.shape[1], scale_x, 0, width, kind), kind == "bicubic")
    out = np.empty((height, width, 3), np.uint8)
    np.add(planes.transpose(1, 2, 0), 0.5, out=out, casting="unsafe")  # in 0..255: rounds
    return out


# PIL's filters (Resample.c): triangle (support 1) and Keys' cubic with a = -0.5 (support 2),
# stretched by the scale when shrinking: that stretch is the antialiasing
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
# input pixels per block of a band weight matrix (one BLAS matmul each): a block computes
# span x outputs products for ~taps x outputs nonzero weights, so small blocks waste less
# (cat.jpg 451x300 -> 224: 0.8 -> 0.63 ms from 32 to 16; 1080p unchanged)
_SPAN = 16
# OpenBLAS runs a matmul of m*n*k <= 65536 * 4 multiply-adds on the calling thread. Bigger
# ones wake its pool, whose threads then spin for a while and took the cores of the
# onnxruntime run that follows preprocessing: Lite0's 10 ms run took 23 ms after a 1080p
# resample (2 cores). So every product here stays under that size, column chunk by chunk;
# the resample is also faster that way (1080p: 7.5 -> 3-5 ms).
_ONE_THREAD = 65536 * 4
Taps = tuple[tuple[int, int, int, int, np.ndarray], ...]


def _filter(kind: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if kind == "bilinear":
        return np.maximum(1.0 - x, 0.0)
    a = -0.5
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


@functools.lru_cache(maxsize=64)
def _taps(size: int, scale: float, first: int, stop: int, kind: str) -> Taps:
    """Weights of outputs [first, stop) of one axis resampled from ``size`` input pixels at
    ``scale`` input pixels per output, as PIL computes them (output j centred at
    (j + 0.5) * scale; in-range taps only, summing to 1).

    -> blocks (o0, o1, i0, i1, weights float32 [o1-o0, i1-i0]), o counted from ``first``.
    """
    stretch = max(scale, 1.0)
    support = _SUPPORT[kind] * stretch
    blocks = []
    block = max(8, int(_SPAN / stretch))  # outputs per block
    for start in range(first, stop, block):
        centers = (np.arange(start, min(start + block, stop)) + 0.5) * scale
        lo = np.clip(np.trunc(centers - support + 0.5), 0, size).astype(int)
        hi = np.clip(np.trunc(centers + support + 0.5), 0, size).astype(int)
        x = np.arange(lo.min(), hi.max())
        weights = _filter(kind, (x[None, :] - centers[:, None] + 0.5) / stretch)
        weights[(x[None, :] < lo[:, None]) | (x[None, :] >= hi[:, None])] = 0.0
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        blocks.append((start - first, start - first + len(centers), int(x[0]), int(x[-1]) + 1,
                       weights.astype(np.float32)))
    return tuple(blocks)


def _resample(rgb: np.ndarray, rows: Taps, cols: Taps, clip: bool) -> np.ndarray:
    """uint8 [h,w,3] -> float32 [3,H,W] in 0..255, two band matmuls: along the height,
    [H, w'*3] = row weights @ the photo's w' columns that the crop reads; then along the
    width, [W, 3*H] = column weights @ that result laid out as [w', 3*H]. Each block's
    product is cut into column chunks that BLAS runs on this thread (``_ONE_THREAD``)."""
    x_lo, x_hi = min(b[2] for b in cols), max(b[3] for b in cols)
    height, width, span = rows[-1][1], cols[-1][1], x_hi - x_lo
    tall = np.empty((height, span * 3), np.float32)
    # one float32 buffer for every block's rows: a 4K frame's blocks are ~4 MB each, and the
    # server maps such blocks afresh and unmaps them on free (lifecycle.return_freed_memory);
    # on a request thread that cost most (likely each unmap's TLB shootdown across the
    # process's threads): 28 blocks took 40-50 ms instead of 11-14 for a 4K frame
    rows_float = np.empty((max(i1 - i0 for _, _, i0, i1, _ in rows), span * 3), np.float32)
    for o0, o1, i0, i1, weights in rows:
        # one pass: the strided uint8 rows -> contiguous float32 [i1-i0, span*3]
        block = rows_float[:i1 - i0]
        np.copyto(block.reshape(i1 - i0, span, 3), rgb[i0:i1, x_lo:x_hi])
        step = max(1, _ONE_THREAD // weights.size)
        for c in range(0, span * 3, step):
            np.matmul(weights, block[:, c:c + step], out=tall[o0:o1, c:c + step])
    if clip:  # the cubic filter over- and undershoots; PIL clips after each pass
        np.clip(tall, 0.0, 255.0, out=tall)
    wide = tall.reshape(height, span, 3).transpose(1, 2, 0).reshape(span, 3 * height)
    out = np.empty((width, 3 * height), np.float32)
    for o0, o1, i0, i1, weights in cols:
        step = max(1, _ONE_THREAD // weights.size)
        for c in range(0, 3 * height, step):
            np.matmul(weights, wide[i0 - x_lo:i1 - x_lo, c:c + step], out=out[o0:o1, c:c + step])
    if clip:
        np.clip(out, 0.0, 255.0, out=out)
    return out.reshape(width, 3, height).transpose(1, 2, 0)
