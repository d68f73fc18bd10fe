"""Request images on their own: header sniffing, decode limits and errors, preprocessing
numerics against the formula in float64, raw pixels."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from camserve.contract import Preprocessing
from camserve.errors import CallerError, LimitError
from camserve.explain.frames import frame_to_rgb as from_pixels
from camserve.explain.image import (
    ImageError,
    declared_size,
    decode,
    decode_for,
    jpeg_is_complete,
    preprocess,
)


def _photo(height: int = 30, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("extension,kind", [(".png", "PNG"), (".jpg", "JPEG"),
                                            (".bmp", "BMP"), (".webp", "WebP")])
def test_header_declares_the_size_of_each_format(extension, kind):
    ok, data = cv2.imencode(extension, _photo(30, 40))
    assert ok
    assert declared_size(data.tobytes()) == (kind, 40, 30)


@pytest.mark.parametrize("extension", [".png", ".bmp"])
def test_lossless_decode_returns_the_rgb_pixels(extension):
    photo = _photo()
    _, data = cv2.imencode(extension, cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(decode(data.tobytes()), photo)


def test_declared_size_is_checked_before_decoding():
    _, data = cv2.imencode(".png", _photo(30, 40))
    with pytest.raises(LimitError, match="declares 40x30 pixels; the limit is 1000"):
        decode(data.tobytes(), max_pixels=1000)


@pytest.mark.parametrize("data,message", [
    (b"", "empty"), (b"hello world", "not a JPEG, PNG, WebP or BMP"),
    (None, "cut short")])
def test_bad_bytes_are_a_caller_error_naming_the_problem(data, message):
    if data is None:  # a JPEG cut in half
        data = cv2.imencode(".jpg", _photo())[1].tobytes()[:300]
    with pytest.raises(ImageError, match=message) as raised:
        decode(data)
    assert isinstance(raised.value, CallerError)


def test_a_cut_jpeg_is_refused_even_after_a_thumbnails_end_marker():
    """An EXIF-style thumbnail (a whole JPEG inside an APP1 segment, end marker included)
    before the frame header: the main image cut short is still refused."""
    main = cv2.imencode(".jpg", _photo(64, 64))[1].tobytes()
    thumbnail = cv2.imencode(".jpg", _photo(8, 8))[1].tobytes()
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(thumbnail)) + b"Exif\0\0" + thumbnail
    whole = main[:2] + app1 + main[2:]
    assert declared_size(whole) == ("JPEG", 64, 64)
    assert jpeg_is_complete(whole) and decode(whole).shape == (64, 64, 3)
    cut = whole[:len(whole) - 200]
    assert not jpeg_is_complete(cut)
    with pytest.raises(ImageError, match="cut short"):
        decode(cut)


def _pil_weights(size: int, out: int, kind: str) -> np.ndarray:
    """[out, size] float64: PIL's resampling weights (Resample.c), one output at a time."""
    scale = size / out
    stretch = max(scale, 1.0)
    support = (1.0 if kind == "bilinear" else 2.0) * stretch

    def tap(x: float) -> float:
        x = abs(x)
        if kind == "bilinear":
            return max(1.0 - x, 0.0)
        return 1.5 * x**3 - 2.5 * x**2 + 1 if x < 1 else \
            -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2 if x < 2 else 0.0

    weights = np.zeros((out, size))
    for j in range(out):
        center = (j + 0.5) * scale
        for x in range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5),
                                                                 size)):
            weights[j, x] = tap((x - center + 0.5) / stretch)
        weights[j] /= weights[j].sum()
    return weights


@pytest.mark.parametrize("size,kind", [((30, 40), "bilinear"), ((90, 130), "bilinear"),
                                       ((12, 17), "bilinear"), ((90, 130), "bicubic")])
def test_preprocess_is_resize_crop_scale_normalise(size, kind):
    """Separable resampling with PIL's weights (antialiased when shrinking) on the whole
    photo, then crop, scale and normalise, in float64: what the crop-only band matmuls do."""
    spec = Preprocessing(resize=20, crop=(16, 16), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
                         interpolation=kind)
    photo = _photo(*size)
    tensor, geometry = preprocess(photo, spec)
    assert tensor.shape == (1, 3, 16, 16) and tensor.dtype == np.float32
    (height, width), (x0, y0, x1, y1) = geometry.resized, geometry.crop
    if size == (30, 40):
        assert geometry.resized == (20, 26) and geometry.crop == (5, 2, 21, 18)
    resized = np.einsum("yh,hwc,xw->yxc", _pil_weights(size[0], height, kind),
                        photo.astype(np.float64), _pil_weights(size[1], width, kind))
    crop = np.clip(resized[y0:y1, x0:x1], 0, 255) / 255.0
    expected = (crop - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(tensor[0], expected.transpose(2, 0, 1), atol=1e-4)


@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
def test_preprocess_matches_pil_within_a_level(kind):
    """torchvision's Resize on a PIL image is PIL's resize (uint8 between and after passes)."""
    image = pytest.importorskip("PIL.Image")
    spec = Preprocessing(resize=64, crop=(56, 56), mean=(0, 0, 0), std=(1, 1, 1),
                         interpolation=kind)
    photo = cv2.GaussianBlur(_photo(300, 451), (0, 0), 1.0)
    tensor, geometry = preprocess(photo, spec)
    resample = image.Resampling.BILINEAR if kind == "bilinear" else image.Resampling.BICUBIC
    resized = np.asarray(image.fromarray(photo).resize(geometry.resized[::-1], resample))
    x0, y0, x1, y1 = geometry.crop
    expected = resized[y0:y1, x0:x1].transpose(2, 0, 1) / 255.0
    assert np.abs(tensor[0] - expected).max() <= 1.0 / 255 + 1e-6


def _smooth_jpeg(height: int, width: int, exif_orientation: int = 0) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width]
    photo = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1)
    photo = cv2.GaussianBlur(photo.astype(np.uint8), (0, 0), 3.0)
    data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    if exif_orientation:  # an APP1 Exif segment (big-endian TIFF, one IFD entry) after SOI
        tiff = (b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01"
                + bytes([0, exif_orientation, 0, 0]) + b"\x00\x00\x00\x00")
        body = b"Exif\x00\x00" + tiff
        data = data[:2] + b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body + data[2:]
    return data


@pytest.mark.parametrize("orientation", [0, 3, 6, 8])
def test_reduced_jpeg_decode_keeps_the_original_geometry(orientation):
    """1040 x 1562 JPEG, model resize 256: decoded at 1/2 (520 >= 2 * 256, 260 is not), the
    geometry still describes the full photo (EXIF rotations included); the model input stays
    close to preprocessing the full decode."""
    spec = Preprocessing(resize=256, crop=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    data = _smooth_jpeg(1040, 1562, orientation)
    full = decode(data)
    assert full.shape[:2] == ((1562, 1040) if orientation in (6, 8) else (1040, 1562))
    reduced = decode_for(data, spec.resize)
    assert reduced.factor == 2 and reduced.original == full.shape[:2]
    assert reduced.rgb.shape[:2] == tuple(n // 2 for n in full.shape[:2])
    tensor, geometry = preprocess(reduced, spec)
    reference, expected = preprocess(full, spec)
    assert geometry == expected and geometry.original == full.shape[:2]
    assert np.abs(tensor - reference).max() < 0.05


def test_what_is_decoded_at_full_size():
    """PNG, a JPEG without room to shrink or whose sides 2 does not divide (libjpeg rounds a
    reduced size up: a part pixel whose side an EXIF rotation hides), no model size: full
    size, factor 1."""
    png = cv2.imencode(".png", _photo(1100, 1200))[1].tobytes()
    assert decode_for(png, 256).factor == 1
    assert decode_for(_smooth_jpeg(1000, 1200), 256).factor == 1  # 500 < 2 * 256
    assert decode_for(_smooth_jpeg(1037, 1563), 256).factor == 1
    assert decode_for(_smooth_jpeg(1037 * 2, 1563 * 2), 256).factor == 2
    assert decode_for(_smooth_jpeg(1100, 1200), 0).factor == 1
    assert decode_for(_smooth_jpeg(2200, 4100), 256).factor == 4
    with pytest.raises(LimitError, match="declares 4100x2200 pixels"):
        decode_for(_smooth_jpeg(2200, 4100), 256, max_pixels=4_000_000)


def test_raw_pixels_are_checked_against_their_size():
    photo = _photo(3, 4)
    np.testing.assert_array_equal(from_pixels(3, 4, photo.tobytes()), photo)
    with pytest.raises(ImageError, match="needs 36 bytes, got 35"):
        from_pixels(3, 4, photo.tobytes()[:-1])
    with pytest.raises(LimitError):
        from_pixels(3, 4, photo.tobytes(), max_pixels=11)
