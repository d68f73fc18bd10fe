"""Noise and flip smoothing of class activation maps (SmoothGrad-CAM++ style averaging).

A request with ``noise_samples`` and/or ``horizontal_flip`` runs the graph once on a batch of
perturbed copies of its image [S,3,H,W] and averages the S maps, mirroring back the maps of
mirrored copies first.
"""

from __future__ import annotations

import numpy as np

from camserve.explain.methods import normalize_maps

NOISE_SIGMA = 0.15  # of (max - min) of the image; SmoothGrad's 10-20 %


def perturbed_batch(image: np.ndarray, noise_samples: int, sigma: float, flip: bool,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``image`` [1,3,H,W] to average over: ``noise_samples`` copies with Gaussian
    noise of std ``sigma`` * (max - min) (or the image itself when 0), then, with ``flip``,
    each of them mirrored. Returns the batch [S,3,H,W] and which rows are mirrored [S]."""
    if noise_samples:
        scale = sigma * float(image.max() - image.min())
        noise = rng.standard_normal((noise_samples, *image.shape[1:]), dtype=np.float32)
        batch = image + np.float32(scale) * noise
    else:
        batch = image.copy()
    mirrored = np.zeros(len(batch), dtype=bool)
    if flip:
        batch = np.concatenate([batch, batch[..., ::-1]])
        mirrored = np.concatenate([mirrored, ~mirrored])
    return np.ascontiguousarray(batch), mirrored


def average_maps(maps: np.ndarray, mirrored: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Mean over samples of maps [S,K,H,W], mirroring back the rows of mirrored images."""
    unmirrored = np.where(mirrored[:, None, None, None], maps[..., ::-1], maps)
    mean = unmirrored.mean(axis=0)
    return normalize_maps(mean) if normalize else mean
