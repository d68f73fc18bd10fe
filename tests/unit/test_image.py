"""Request images on their own: header sniffing, decode limits and errors, preprocessing
numerics against the formula in float64, raw pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camserve.contract import Preprocessing
from camserve.errors import CallerError, LimitError
from camserve.explain.image import ImageError, declared_size, decode, from_pixels, preprocess


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
    ok, data = cv2.imencode(extension, cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(decode(data.tobytes()), photo)


def test_declared_size_is_checked_before_decoding():
    ok, data = cv2.imencode(".png", _photo(30, 40))
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


def test_preprocess_is_resize_crop_scale_normalise():
    spec = Preprocessing(resize=20, crop=(16, 16), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    photo = _photo(30, 40)
    tensor, geometry = preprocess(photo, spec)
    assert tensor.shape == (1, 3, 16, 16) and tensor.dtype == np.float32
    assert geometry.resized == (20, 26) and geometry.crop == (5, 2, 21, 18)
    resized = cv2.resize(photo, (26, 20), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    crop = resized[2:18, 5:21] / 255.0
    expected = (crop - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(tensor[0], expected.transpose(2, 0, 1), atol=1e-5)


def test_raw_pixels_are_checked_against_their_size():
    photo = _photo(3, 4)
    np.testing.assert_array_equal(from_pixels(3, 4, photo.tobytes()), photo)
    with pytest.raises(ImageError, match="needs 36 bytes, got 35"):
        from_pixels(3, 4, photo.tobytes()[:-1])
    with pytest.raises(LimitError):
        from_pixels(3, 4, photo.tobytes(), max_pixels=11)
