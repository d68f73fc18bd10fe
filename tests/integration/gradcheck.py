"""Gradients against float64 autograd: a check that a ReLU kink does not fail and a wrong
adjoint does.

Why not one element-wise tolerance. The gradient of a ReLU (or MaxPool, Hardswish) network
is piecewise constant in its input and jumps where a unit crosses its kink. The explainer
graphs compute in float32, and a unit whose pre-activation is within float32 rounding of 0
can land on either side, depending on how the CPU's kernels round. On a random resnet18
(tests/integration/test_attributions.py, seed 0) onnxruntime's input gradient differs from float64
autograd by 9.2e-3 of its max on this machine, and moving the float64 input by 1e-5 moves
the float64 gradient itself by 1.6e-2 over half of its elements: one unit late in the
network sits at its kink, and its receptive field is the whole picture. No element-wise
tolerance both passes that and fails a 1 % error in one adjoint.

The criterion. ``r`` is float64 autograd at the input ``x`` (``float64(module)``);
``r_i`` is float64 autograd at the neighbours ``x ± DELTA * rms(x) * u_i`` of ``x``
(``neighbours``: ``DIRECTIONS`` fixed-seed Gaussian directions ``u_i``, both signs), with
the classes resolved at ``x``. The *kink spread* of an element is ``s = sum_i |r_i - r|``:
zero where no unit within reach of float32 rounding sits on a kink, and otherwise as large
as the jumps those units can cause. ``scale = max |r|``. A gradient ``a`` passes when

(a) ``|a - r| <= TOLERANCE * scale + s`` element-wise: away from kinks (``s = 0``) that is
    the old tight check; at them, ``a`` may move as far as the reference itself moves
    across the neighbours; and
(b) at least ``MIN_STABLE`` of the elements have ``s <= TOLERANCE * scale``: there the
    check is the tight one, so a wrong adjoint has many elements on which to fail. (b)
    depends on float64 values only and so is the same on every machine; if an input
    fails it, the test's input is too close to kinks to be sharp: pick another.

Why these numbers (measured on random resnet18 inputs, 96x96). ``DELTA = 1e-5`` of the
input's rms: float32 rounding of deep activations is about 1e-7..1e-6 relative; moving the
float64 input by 1e-6 changed no gradient on four inputs although float32 flipped a unit on
one of them; float64 gradients 2e-6..6e-6 away in other random directions (stand-ins for
float32 on other CPUs) were on the far side of a kink in 29 of 64 cases, and all 29 pass
with 4 directions (with 2, 8 failed); at 1e-4 nearly every element moves and the check
would go soft. Both signs of each direction, so a unit within reach crosses its kink in
one of the two. The spread is a sum, not a max: float32 may flip several units that the
neighbours flip separately, and their jumps add. Smooth activations (SiLU) make ``s`` of
order ``DELTA`` times the curvature, far below ``TOLERANCE``.

Cost. The neighbours are 8 more float64 passes, so they are computed only when the plain
error ``max |a - r|`` exceeds ``TOLERANCE * scale``: otherwise (a) holds (``s >= 0``) and
the check already is the tight one everywhere, which is all (b) asks for.

The same trap in the classes: a ranked target (-r) whose logit is within float32 rounding
of the next one could resolve to another class. ``resolve_classes`` ranks the float64
logits and rejects an input whose ranked targets are closer than ``RANK_MARGIN`` of the
largest |logit| (deterministic: float64 only).

The float64 reference runs the same module in float64 (a cached deep copy: ``.double()``
on the tests' own module would change it in place for every other test).
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

DELTA = 1e-5  # neighbour distance, relative to the input's rms
DIRECTIONS = 4  # random directions, each taken with both signs: 8 neighbours
TOLERANCE = 1e-4  # of max |reference|, where the reference is stable
MIN_STABLE = 0.2  # the fraction of elements that must be stable (checked to TOLERANCE)
RANK_MARGIN = 1e-5  # of max |logit|: ranked targets need gaps wider than float32 rounding

_FLOAT64: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = (
    weakref.WeakKeyDictionary())


def float64(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``module`` in eval mode, made once per module."""
    if module not in _FLOAT64:
        _FLOAT64[module] = copy.deepcopy(module).double().eval()
    return _FLOAT64[module]


def neighbours(x: np.ndarray, directions: int = DIRECTIONS,
               delta: float = DELTA) -> list[np.ndarray]:
    """``x ± delta * rms(x) * u_i`` in float64, ``u_i`` standard normal from a fixed seed."""
    x = np.asarray(x, np.float64)
    step = delta * float(np.sqrt(np.mean(x * x)) or 1.0)
    rng = np.random.default_rng(20261204)
    out = []
    for _ in range(directions):
        u = rng.standard_normal(x.shape)
        out += [x + step * u, x - step * u]
    return out


def resolve_classes(logits: np.ndarray, targets, margin: float = RANK_MARGIN) -> np.ndarray:
    """Graph contract v1's targets -> classes on float64 ``logits`` [B,N]: ``targets``
    [B,K] (>= 0 a class, -r the r-th highest logit). A ranked target whose logit is within
    ``margin * max |logits|`` of its neighbours in the ranking could resolve differently in
    float32: that input is rejected (deterministically) rather than left to the CPU."""
    targets = np.asarray(targets, np.int64)
    ranking = np.argsort(-logits, axis=1, kind="stable")
    ranks = np.maximum(-targets - 1, 0)
    classes = np.where(targets >= 0, targets, np.take_along_axis(ranking, ranks, axis=1))
    ordered = np.take_along_axis(logits, ranking, axis=1)
    gap = margin * float(np.abs(logits).max())
    for b, r in zip(*np.nonzero(targets < 0)):
        rank = ranks[b, r]
        near = [ordered[b, j] for j in (rank - 1, rank + 1) if 0 <= j < logits.shape[1]]
        assert all(abs(ordered[b, rank] - v) > gap for v in near), (
            f"sample {b}: rank {rank + 1} is within {margin:g} x max|logit| of the next; "
            "float32 may rank it differently (pick another input)")
    return classes


class Reference:
    """A float64 gradient ``value`` and, computed only when asked for, its kink spread (see
    the module docstring; same shape) from the gradients at ``neighbours(x)``, which
    ``at_neighbours`` returns."""

    def __init__(self, value: np.ndarray,
                 at_neighbours: Callable[[], Sequence[np.ndarray]]) -> None:
        self.value = np.asarray(value, np.float64)
        self._at_neighbours = at_neighbours

    @functools.cached_property
    def spread(self) -> np.ndarray:
        spread = np.zeros_like(self.value)
        for other in self._at_neighbours():
            spread += np.abs(np.asarray(other, np.float64) - self.value)
        return spread


@dataclass(frozen=True)
class Verdict:
    """How a gradient compares with a Reference, in units of max |reference|. ``excess``
    and ``stable`` are None when the plain error already passed (the neighbours were not
    computed: ``excess <= plain`` always)."""

    plain: float  # max |a - r|: the old element-wise measure
    excess: float | None = None  # max of (|a - r| - spread): (a) asks <= tolerance
    stable: float | None = None  # fraction with spread <= tolerance: (b) asks >= MIN_STABLE

    def __str__(self) -> str:
        text = f"max error {self.plain:.3g}"
        if self.excess is not None:
            text += f", beyond the kink spread {self.excess:.3g}, stable {self.stable:.1%}"
        return text + " (x max|ref|)"


def compare(actual: np.ndarray, reference: Reference, tolerance: float = TOLERANCE,
            lazy: bool = True) -> Verdict:
    """The measures behind ``assert_gradients_close``, without asserting them; with
    ``lazy`` the neighbours are left alone when the plain error is within ``tolerance``."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == reference.value.shape, (actual.shape, reference.value.shape)
    scale = float(np.abs(reference.value).max())
    assert scale > 0, "the reference is all zeros"
    error = np.abs(actual - reference.value)
    plain = float(error.max()) / scale
    if lazy and plain <= tolerance:
        return Verdict(plain)
    spread = reference.spread
    return Verdict(plain, excess=float((error - spread).max()) / scale,
                   stable=float(np.mean(spread <= tolerance * scale)))


def assert_gradients_close(actual: np.ndarray, reference: Reference, what: str = "gradients",
                           tolerance: float = TOLERANCE,
                           min_stable: float = MIN_STABLE) -> Verdict:
    """Criteria (a) and (b) of the module docstring; returns the measures."""
    verdict = compare(actual, reference, tolerance)
    if verdict.excess is None:
        return verdict
    assert verdict.stable >= min_stable, (
        f"{what}: {verdict}; only {verdict.stable:.1%} of the reference is away from kinks "
        f"(need {min_stable:.0%}): the input is too ill-conditioned to be a sharp test")
    assert verdict.excess <= tolerance, f"{what}: {verdict}: beyond {tolerance:g}"
    return verdict
