"""Temporal smoothing of a stream's maps (camserve.explain.temporal) against its formulas."""

from __future__ import annotations

import numpy as np
import pytest

from camserve.errors import CamserveError
from camserve.explain.pipeline import Target
from camserve.explain.temporal import MAX_AGE, TemporalSmoother, correlation


def _targets(*maps_by_class) -> list[Target]:
    return [Target(c, f"class {c}", 0.0, 0.5, m) for c, m in maps_by_class]


def _map(seed: int, shape=(7, 9)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_correlation_is_pearsons():
    a, b = _map(1), _map(2)
    assert correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-9)
    assert correlation(a, 3 * a + 1) == pytest.approx(1.0)
    assert correlation(a, -a) == pytest.approx(-1.0)
    flat = np.zeros((7, 9), np.float32)
    assert correlation(flat, flat) == 1.0 and correlation(flat, a) == 0.0


def test_ema_per_class_in_float32():
    alpha = 0.3
    smoother = TemporalSmoother(alpha, scene_change=-1)  # never restart
    expected: dict[int, np.ndarray] = {}
    for frame in range(6):
        maps = {3: _map(frame), 7: _map(100 + frame)}
        out = smoother.apply(_targets(*maps.items()))
        for target in out:
            new = maps[target.class_index]
            previous = expected.get(target.class_index)
            expected[target.class_index] = new if previous is None else \
                alpha * new + (1 - alpha) * previous
            np.testing.assert_allclose(target.cam, expected[target.class_index], atol=1e-6)
            assert target.cam.dtype == np.float32
            assert target.label == f"class {target.class_index}"  # only the map changes


def test_scene_change_and_reset_restart_the_average():
    smoother = TemporalSmoother(0.5, scene_change=0.5)
    a = _map(1)
    smoother.apply(_targets((1, a)))
    near = a + 0.05 * _map(2)  # correlates ~1 with a: averaged
    out = smoother.apply(_targets((1, near)))[0].cam
    np.testing.assert_allclose(out, 0.5 * near + 0.5 * a, atol=1e-6)
    other = _map(3)  # uncorrelated: a new scene, the map as it is
    assert correlation(other, out) < 0.5
    np.testing.assert_array_equal(smoother.apply(_targets((1, other)))[0].cam, other)
    assert smoother.resets == 1
    again = other + 0.01
    np.testing.assert_array_equal(smoother.apply(_targets((1, again)), reset=True)[0].cam,
                                  again)


def test_shape_change_age_and_missing_maps():
    smoother = TemporalSmoother(0.5, scene_change=-1)
    smoother.apply(_targets((1, _map(1))))
    bigger = _map(2, (14, 18))
    np.testing.assert_array_equal(smoother.apply(_targets((1, bigger)))[0].cam, bigger)
    for _ in range(MAX_AGE + 1):  # class 1 unseen for longer than MAX_AGE: forgotten
        smoother.apply(_targets((2, _map(5))))
    fresh = _map(4, (14, 18))
    np.testing.assert_array_equal(smoother.apply(_targets((1, fresh)))[0].cam, fresh)
    no_map = Target(1, "x", 0.0, 0.5, None)  # CamSpace NO_MAP: nothing to smooth
    assert smoother.apply([no_map]) == [no_map]


def test_one_class_twice_in_a_frame_is_folded_in_once():
    smoother = TemporalSmoother(0.5, scene_change=-1)
    a, b = _map(1), _map(2)
    smoother.apply(_targets((4, a)))
    first, second = smoother.apply(_targets((4, b), (4, b)))
    np.testing.assert_allclose(first.cam, 0.5 * a + 0.5 * b, atol=1e-6)
    np.testing.assert_array_equal(first.cam, second.cam)


@pytest.mark.parametrize("alpha, scene", [(0.0, 0.5), (1.5, 0.5), (0.5, 2.0), (-0.1, 0.5)])
def test_bad_settings_are_refused(alpha, scene):
    with pytest.raises(CamserveError):
        TemporalSmoother(alpha, scene)
