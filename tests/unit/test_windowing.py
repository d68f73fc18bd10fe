"""Intensity windowing of encoded images (16-bit X-ray PNGs and others) against an independent
float64 NumPy computation of the stated formula:

    lower = center - width / 2,  v8 = floor(clip((v - lower) / width, 0, 1) * 255 + 0.5)

with the image's own min..max as the window when a 16-bit PNG comes without one.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camserve.client import ExplainOptions
from camserve.errors import CallerError, LimitError
from camserve.explain.image import ImageError, Window, decode, decode_for, to_8bit


def _reference(samples: np.ndarray, lower: float, width: float) -> np.ndarray:
    v = samples.astype(np.float64)
    return np.floor(np.clip((v - lower) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _png(samples: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", samples)
    assert ok
    return data.tobytes()


def _xray(height: int = 70, width: int = 60, seed: int = 0) -> np.ndarray:
    """A 12-bit-range uint16 gray picture: a smooth body with noise, levels 300..3800."""
    y, x = np.mgrid[0:height, 0:width]
    body = np.exp(-(((y - height / 2) / (height / 3)) ** 2 + ((x - width / 2) / (width / 4)) ** 2))
    noise = np.random.default_rng(seed).normal(0, 40, (height, width))
    return np.clip(300 + 3500 * body + noise, 300, 3800).astype(np.uint16)


def test_a_16bit_png_is_windowed_over_its_own_min_max():
    xray = _xray()
    got = decode(_png(xray))
    expected = _reference(xray, float(xray.min()), float(xray.max() - xray.min()))
    assert got.shape == (*xray.shape, 3) and got.dtype == np.uint8
    for channel in range(3):  # gray replicated into R, G and B
        np.testing.assert_array_equal(got[..., channel], expected)
    assert got.min() == 0 and got.max() == 255


@pytest.mark.parametrize("center, width", [(2000.0, 1500.0), (1000.0, 4000.0), (3700.5, 1.0)])
def test_a_fixed_window_clips_and_scales_as_stated(center, width):
    xray = _xray(seed=1)
    got = decode(_png(xray), window=Window(center, width))
    np.testing.assert_array_equal(got[..., 0], _reference(xray, center - width / 2, width))


def test_every_16bit_level_matches_the_formula():
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    for window in (Window(32767.5, 65535.0), Window(2048.0, 4096.0), Window(100.0, 3.0)):
        np.testing.assert_array_equal(
            to_8bit(levels, window),
            _reference(levels, window.center - window.width / 2, window.width))


def test_a_colour_16bit_png_shares_one_window_over_all_channels():
    rng = np.random.default_rng(2)
    bgr = rng.integers(1000, 50000, (20, 30, 3), dtype=np.uint16)
    got = decode(_png(bgr))
    low, high = float(bgr.min()), float(bgr.max())
    np.testing.assert_array_equal(got, _reference(bgr[..., ::-1], low, high - low))


def test_a_constant_16bit_png_becomes_black():
    assert not decode(_png(np.full((8, 9), 1234, np.uint16))).any()


def test_8bit_images_are_unchanged_without_a_window_and_windowed_with_one():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (16, 24), dtype=np.uint8)
    data = _png(gray)
    np.testing.assert_array_equal(decode(data)[..., 1], gray)  # as before: no stretching
    np.testing.assert_array_equal(decode(data, window=Window(100.0, 80.0))[..., 1],
                                  _reference(gray, 60.0, 80.0))


def test_a_window_decodes_at_full_size_even_for_a_large_jpeg():
    _, data = cv2.imencode(".jpg", np.full((1600, 1600, 3), 128, np.uint8))
    assert decode_for(data.tobytes(), 200).factor == 4  # without a window: reduced
    windowed = decode_for(data.tobytes(), 200, window=Window(128.0, 64.0))
    assert windowed.factor == 1 and windowed.rgb.shape == (1600, 1600, 3)


@pytest.mark.parametrize("center, width", [(100.0, 0.0), (100.0, -5.0), (float("nan"), 10.0),
                                           (100.0, float("inf"))])
def test_a_bad_window_is_refused_with_its_values(center, width):
    with pytest.raises(ImageError, match="a width > 0"):
        Window(center, width)
    with pytest.raises(CallerError, match="a width > 0"):
        ExplainOptions(window=(center, width))


def test_the_sdk_sends_the_window_for_files_only(tmp_path):
    request = ExplainOptions(window=(2048, 4096)).to_request(b"\x89PNG...")
    assert (request.window.center, request.window.width) == (2048.0, 4096.0)
    assert not ExplainOptions().to_request(b"\x89PNG...").HasField("window")
    with pytest.raises(CallerError, match="window applies to encoded files"):
        ExplainOptions(window=(2048, 4096)).to_request(np.zeros((4, 4, 3), np.uint8))


def test_a_truncated_16bit_png_header_is_a_clear_error():
    data = _png(_xray())
    with pytest.raises(CallerError):
        decode(data[:25])
    with pytest.raises(CallerError):
        decode(data[:24])


@pytest.mark.parametrize("window", [None, Window(2048.0, 4096.0)])
def test_the_declared_size_bounds_a_16bit_decode(window):
    """A 16-bit PNG whose header declares 20000 x 20000 pixels (800 MB of samples) is refused
    from its header, with or without a window, before anything is decoded."""
    data = bytearray(_png(_xray()))
    data[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR width, height
    with pytest.raises(LimitError, match="declares 20000x20000 pixels"):
        decode(bytes(data), max_pixels=36_000_000, window=window)
