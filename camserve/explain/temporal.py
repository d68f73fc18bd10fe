"""Temporal smoothing of a stream's maps: an exponential moving average per target class.

Frame after frame of a video, a class's map moves a little with noise and compression; an
EMA steadies it:

    smoothed_t = alpha * map_t + (1 - alpha) * smoothed_{t-1},   smoothed_0 = map_0

one running average per class, in the space the response carries (the maps of
``Explained.targets``, [H',W'] float32). A class's average restarts at a scene change (the
Pearson correlation between its new map and its running average is below
``scene_change_correlation``), when its map's shape changes, when the caller asks
(``reset``), and after the class was not explained for ``MAX_AGE`` frames. The average is
not normalised again: maps in [0, 1] stay in [0, 1].

Only ``cam`` changes: logits, probabilities and anything else a ``Target`` carries (e.g.
server-side regions) describe the frame's own, unsmoothed result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from camserve.errors import CamserveError

DEFAULT_SCENE_CHANGE = 0.5  # StreamOptions.scene_change_correlation = 0
MAX_AGE = 30  # frames a class's average is kept while the class is not explained


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps of one shape, in [-1, 1]. A constant map correlates
    1 with an equal map and 0 with any other."""
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    x = x - x.mean()
    y = y - y.mean()
    scale = np.sqrt((x * x).sum() * (y * y).sum())
    if scale == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float((x * y).sum() / scale)


@dataclass
class _Average:
    cam: np.ndarray  # float32 [H',W']
    seen: int  # the frame number it was last updated at


class TemporalSmoother:
    """The running averages of one stream. ``alpha`` in (0, 1] (1: no smoothing);
    ``scene_change`` in [-1, 1] (-1: never restart on a scene change)."""

    def __init__(self, alpha: float, scene_change: float = DEFAULT_SCENE_CHANGE) -> None:
        if not 0 < alpha <= 1:
            raise CamserveError(f"temporal_smoothing must be in (0, 1] (0: off), got {alpha}")
        if not -1 <= scene_change <= 1:
            raise CamserveError("scene_change_correlation must be in [-1, 1] (0: "
                                f"{DEFAULT_SCENE_CHANGE}), got {scene_change}")
        self.alpha = float(alpha)
        self.scene_change = float(scene_change)
        self._averages: dict[int, _Average] = {}
        self._frame = 0
        self.resets = 0  # scene changes detected (caller resets not counted)

    def reset(self) -> None:
        """Forget every average: the next frame starts afresh."""
        self._averages.clear()

    def update(self, class_index: int, cam: np.ndarray) -> np.ndarray:
        """Fold one class's new map [H',W'] into its average; returns the smoothed map
        (float32, same shape)."""
        cam = np.asarray(cam, np.float32)
        previous = self._averages.get(class_index)
        if previous is not None and (
                previous.cam.shape != cam.shape or self._frame - previous.seen > MAX_AGE
                or correlation(cam, previous.cam) < self.scene_change):
            if previous.cam.shape == cam.shape and self._frame - previous.seen <= MAX_AGE:
                self.resets += 1
            previous = None
        if previous is None:
            smoothed = cam.copy()
        else:
            smoothed = (self.alpha * cam + (1 - self.alpha) * previous.cam).astype(np.float32)
        self._averages[class_index] = _Average(smoothed, self._frame)
        return smoothed

    def apply(self, targets: list, reset: bool = False) -> list:
        """One frame's targets (``camserve.explain.pipeline.Target``) with smoothed maps; a
        target without a map (CamSpace NO_MAP) is returned as it is. Classes not seen for
        ``MAX_AGE`` frames are forgotten."""
        if reset:
            self.reset()
        self._frame += 1
        out, done = [], {}  # a class asked for twice in a frame is folded in once
        for target in targets:
            if target.cam is None or np.size(target.cam) == 0:
                out.append(target)
                continue
            if target.class_index not in done:
                done[target.class_index] = self.update(target.class_index, target.cam)
            out.append(dataclasses.replace(target, cam=done[target.class_index]))
        stale = [c for c, a in self._averages.items() if self._frame - a.seen > MAX_AGE]
        for class_index in stale:
            del self._averages[class_index]
        return out
