"""Preprocessing fidelity on camera-sized frames: the model input the pipeline builds from a
1080p or 4K frame (JPEG quality 95, and raw RGB) against torchvision's training-time
transform, ``Resize(resize)`` (antialiased) + ``CenterCrop`` + ``Normalize`` on the PIL image
of the same pixels (for a JPEG: its full-size decode, what training saw), and the top-1 class
of the pretrained EfficientNet-Lite0 export on both.

    .venv/bin/python -m pytest -q -s tests/integration/test_downscale.py   # prints the numbers

Measured (Lite0: resize 256, crop 224, mean = std = 0.5; max |difference| in normalised
units; "bilinear" is the preprocessing before antialiasing, cv2.resize INTER_LINEAR):
raw 1080p 0.0071 (bilinear 0.39), raw 4K 0.0062 (bilinear 0.45), JPEG 1080p decoded at 1/2
0.029 (bilinear 0.37), JPEG 4K decoded at 1/4 0.037 (bilinear 0.40); top-1 285 (Egyptian cat)
from ours and torchvision's input on all four, 282 (tiger cat) from the bilinear one.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from camserve.explain.geometry import Geometry
from camserve.explain.image import decode, decode_for
from camserve.explain.pipeline import Pipeline
from camserve.v1 import explainer_pb2 as pb

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SIZES = {"1080p": (1080, 1920), "4K": (2160, 3840)}
FACTORS = {"1080p": 2, "4K": 4}  # JPEG decoded at 1/f: shorter side 540 >= 2 * 256


def textured_frame(height: int, width: int) -> np.ndarray:
    """uint8 RGB [H,W,3]: the cat photo upscaled (bicubic), plus two fine sinusoids (periods
    of about 7 and 5 pixels) and Gaussian noise (sigma 8): detail a plain bilinear resize
    aliases. Deterministic."""
    cat = cv2.cvtColor(cv2.imread(str(SAMPLES / "cat.jpg")), cv2.COLOR_BGR2RGB)
    frame = cv2.resize(cat, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frame += (20 * np.sin(xx * 0.9 + yy * 0.35) + 15 * np.sin(yy * 1.3))[..., None]
    frame += np.random.default_rng(0).normal(0, 8, frame.shape).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8)


def torchvision_input(rgb: np.ndarray, spec) -> np.ndarray:
    """float32 [1,3,H,W]: the training-time transform on the PIL image of ``rgb``."""
    transform = T.Compose([T.Resize(spec.resize, antialias=True), T.CenterCrop(spec.crop),
                           T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    return transform(Image.fromarray(rgb)).numpy()[None]


def bilinear_input(rgb: np.ndarray, spec) -> np.ndarray:
    """float32 [1,3,H,W]: the preprocessing before this change (cv2 bilinear, no
    antialiasing), for contrast."""
    g = Geometry.for_image(*rgb.shape[:2], spec.resize, spec.crop)
    x0, y0, x1, y1 = g.crop
    resized = cv2.resize(rgb, g.resized[::-1], interpolation=cv2.INTER_LINEAR)
    crop = resized[y0:y1, x0:x1].astype(np.float32) * spec.scale
    return ((crop - np.float32(spec.mean)) / np.float32(spec.std)).transpose(2, 0, 1)[None]


@pytest.fixture(scope="module")
def lite0(lite0_dir):
    from camserve.server.runtime import load_model

    return load_model(lite0_dir / "efficientnet_lite0.onnx", device="cpu")


def _top1(model, image: np.ndarray) -> int:
    logits = model.session.run(["logits"], {"image": image,
                                            "targets": np.full((1, 1), -1, np.int64)})[0]
    return int(np.argmax(logits[0]))


@pytest.mark.parametrize("form,bound", [("raw", 0.02), ("jpeg", 0.06)])
@pytest.mark.parametrize("size", SIZES)
def test_model_input_matches_torchvision(lite0, size, form, bound):
    spec = lite0.card.preprocessing
    frame = textured_frame(*SIZES[size])
    if form == "raw":
        request = pb.ExplainRequest(pixels=pb.RawImage(height=frame.shape[0],
                                                       width=frame.shape[1],
                                                       pixels=frame.tobytes()))
        seen = frame
    else:
        bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        request = pb.ExplainRequest(encoded=data)
        seen = decode(data)  # full size: what torchvision and the bilinear path get
        assert decode_for(data, spec.resize).factor == FACTORS[size]
    job = Pipeline().prepare(request, lite0)
    assert job.geometry == Geometry.for_image(*SIZES[size], spec.resize, spec.crop)
    reference = torchvision_input(seen, spec)
    ours = np.abs(job.image - reference).max()
    bilinear = np.abs(bilinear_input(seen, spec) - reference).max()
    top1 = _top1(lite0, reference), _top1(lite0, job.image), _top1(lite0, bilinear_input(seen,
                                                                                        spec))
    print(f"\n{size} {form}: max |ours - torchvision| {ours:.4f} (bilinear {bilinear:.4f}); "
          f"top-1 torchvision {top1[0]}, ours {top1[1]}, bilinear {top1[2]}")
    assert ours <= bound
    assert bilinear >= 5 * ours
    assert top1[1] == top1[0]
