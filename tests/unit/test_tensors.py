"""``camserve.tensors``: the float32 <-> float16 cast that maps take to and from the wire is
NumPy's to the bit, and Tensor messages round-trip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from camserve import tensors
from camserve.v1 import explainer_pb2 as pb


def _float32_edges() -> np.ndarray:
    """Every 4099th float32 bit pattern (all exponents, both signs, both sides of each
    float16 rounding boundary), values of maps in [0, 1], and the special cases."""
    patterns = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    maps = np.random.default_rng(0).random(100_000, dtype=np.float32)
    special = np.array([0.0, -0.0, 65504, 65519, 65520, -65520, 2.0**-24, 2.0**-25,
                        2.98e-8, 1e-45, np.inf, -np.inf, np.nan, -np.nan], np.float32)
    return np.concatenate([patterns, maps, special])


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, where NaNs are equal as NaNs (payloads may differ)."""
    integer = np.uint16 if a.dtype == np.float16 else np.uint32
    return bool(np.all((a.view(integer) == b.view(integer)) | (np.isnan(a) & np.isnan(b))))


def test_float32_to_float16_is_numpys_rounding():
    values = _float32_edges()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow to inf
        expected = values.astype(np.float16)
    assert _same_bits(tensors.cast(values, np.float16), expected)


def test_float16_to_float32_is_exact_for_every_half():
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    assert _same_bits(tensors.cast(halves, np.float32), halves.astype(np.float32))


@pytest.mark.parametrize("shape", [(3,), (5, 4), (2, 7, 3), (1, 2, 3, 4), (0, 3)])
def test_cast_keeps_any_shape(shape):
    """A last axis of 3 or 4 is not read as colour channels; empty arrays pass."""
    array = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for source, target in ((array, np.float16), (array.astype(np.float16), np.float32)):
        out = tensors.cast(source, target)
        assert out.shape == shape and out.dtype == target and out.flags.c_contiguous
        np.testing.assert_array_equal(out, source.astype(target))


def test_cast_copies_unless_told_not_to():
    array = np.ones((4, 4), np.float32)
    assert tensors.cast(array, np.float32, copy=False) is array
    copied = tensors.cast(array, np.float32)
    assert copied is not array and not np.shares_memory(copied, array)
    strided = array[:, ::2]  # not contiguous: a copy either way
    assert tensors.cast(strided, np.float32, copy=False).flags.c_contiguous


def test_levels_clip_and_round_halves_to_even():
    """Expectations not computed the way ``to_levels`` computes them: (k + 0.5) / 255 gives
    exactly k + 0.5 in float32 and goes to the even neighbour, a little either side goes
    to the nearer level; a float64 round of the product for random maps; values
    outside [0, 1] and infinities saturate."""
    k = np.arange(255)
    halves = (k.astype(np.float32) + np.float32(0.5)) / np.float32(255)
    np.testing.assert_array_equal(tensors.to_levels(halves), k + k % 2)
    nudge = np.float32(1e-6)  # x 255 is far above float32's rounding of the product
    np.testing.assert_array_equal(tensors.to_levels(halves + nudge), k + 1)
    np.testing.assert_array_equal(tensors.to_levels(halves - nudge), k)
    maps = np.random.default_rng(3).random((40, 50), dtype=np.float32)
    product = maps.astype(np.float64) * 255  # exact, so only the halves could differ
    levels = tensors.to_levels(maps)
    assert levels.shape == (40, 50) and levels.dtype == np.uint8
    assert np.abs(levels - product).max() <= 0.5
    outside = np.array([-0.0, -0.001, -3.0, -np.inf, 1.0, 1.0000001, 7.0, np.inf], np.float32)
    np.testing.assert_array_equal(tensors.to_levels(outside), [0] * 4 + [255] * 4)
    assert tensors.to_levels(np.zeros((0, 5), np.float32)).shape == (0, 5)


@pytest.mark.parametrize("dtype", [pb.FLOAT32, pb.FLOAT16, pb.UINT8])
def test_tensor_messages_round_trip(dtype):
    array = np.random.default_rng(2).random((2, 5, 6), dtype=np.float32)
    if dtype == pb.UINT8:
        array = np.rint(array * 255)
    message = tensors.to_proto(array, dtype)
    back = tensors.from_proto(pb.Tensor.FromString(message.SerializeToString()))
    assert back.shape == array.shape and list(message.shape) == [2, 5, 6]
    np.testing.assert_array_equal(back, array.astype(back.dtype))
