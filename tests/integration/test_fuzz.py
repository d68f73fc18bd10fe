"""Property-based fuzzing of image decoding and request validation: whatever arrives, the
answer is a result or a CamserveError (a clear status), never another exception."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camserve.errors import CamserveError
from camserve.explain.frames import LAYOUTS, frame_bytes, frame_to_rgb
from camserve.explain.image import decode
from camserve.server.repository import ModelRepository
from camserve.server.runtime import load_models
from camserve.server.service import ExplainerService
from camserve.v1 import explainer_pb2 as pb

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

_PHOTO = cv2.resize(np.random.default_rng(2).integers(0, 256, (6, 6, 3), dtype=np.uint8),
                    (40, 30))
SEEDS = [cv2.imencode(ext, _PHOTO)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".webp")]


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@FUZZ
@given(st.one_of(st.binary(max_size=2048), mutated_images()))
def test_decode_returns_rgb_or_a_clear_error(data):
    try:
        rgb = decode(data, max_pixels=4_000_000)
    except CamserveError as exc:
        assert str(exc)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@st.composite
def raw_frames(draw) -> tuple[int, int, bytes, int, int]:
    """(height, width, pixels, format, step) of a RawImage: mostly the exact byte count of a
    known format (odd sizes, padded and too-short steps included), sometimes one byte off,
    sometimes a format value no server knows."""
    pixel_format = draw(st.one_of(st.sampled_from(sorted(LAYOUTS)),
                                  st.integers(-2**31, 2**31 - 1)))  # int32 on the wire
    height, width = draw(st.integers(0, 24)), draw(st.integers(0, 24))
    layout = LAYOUTS.get(pixel_format, LAYOUTS[0])
    row = layout.row_bytes(width)
    step = draw(st.sampled_from([0, row, row + 1, row + 2, row + 64, max(row - 1, 0),
                                 2**32 - 1]))  # uint32 on the wire
    size = frame_bytes(layout, height, step or row) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    size = size if 0 <= size <= 100_000 else draw(st.integers(0, 64))
    pixels = draw(st.binary(min_size=size, max_size=size))
    return height, width, pixels, pixel_format, step


@FUZZ
@given(raw_frames())
def test_frames_decode_to_rgb_or_a_clear_error(frame):
    height, width, pixels, pixel_format, step = frame
    try:
        rgb = frame_to_rgb(height, width, pixels, pixel_format, step, max_pixels=400)
    except CamserveError as exc:
        assert str(exc)
        return
    assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)


@pytest.fixture(scope="module")
def service(models_dir):
    return ExplainerService(ModelRepository(load_models(models_dir, device="cpu"), default="tiny"))


dtypes = st.sampled_from([0, pb.FLOAT32, pb.FLOAT16, pb.UINT8, pb.INT64, 99])
tensors = st.builds(
    lambda dtype, shape, data: pb.Tensor(dtype=dtype, shape=shape, data=data),
    dtypes, st.lists(st.integers(-2, 70), max_size=5), st.binary(max_size=64))
requests = st.builds(
    lambda model, classes, top_k, method, layers, fusion, space, dtype, image, raw_maps,
    samples, sigma, flip: _request(model, classes, top_k, method, layers, fusion, space, dtype,
                                   image, raw_maps, samples, sigma, flip),
    st.sampled_from(["", "tiny", "tiny2", "nope"]),
    st.lists(st.integers(-20, 20), max_size=4), st.integers(0, 12),
    st.sampled_from(["", "gradcam", "layercam", "eigencam", "magic"]),
    st.lists(st.sampled_from(["features", "features.2", "features.6", "x"]), max_size=2),
    st.integers(0, 5), st.integers(0, 5), st.integers(0, 6),
    st.one_of(tensors, st.just(SEEDS[0]), st.binary(max_size=64),
              st.tuples(st.integers(0, 40), st.integers(0, 40), st.binary(max_size=64)),
              raw_frames()),
    st.booleans(), st.integers(0, 3), st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    st.booleans())


def _request(model, classes, top_k, method, layers, fusion, space, dtype, image, raw_maps,
             samples, sigma, flip) -> pb.ExplainRequest:
    request = pb.ExplainRequest(
        model=model, classes=classes, top_k=top_k, method=method, layers=layers, fusion=fusion,
        output=pb.OutputOptions(space=space, dtype=dtype), raw_maps=raw_maps,
        smoothing=pb.Smoothing(noise_samples=samples, noise_sigma=sigma, horizontal_flip=flip))
    if isinstance(image, pb.Tensor):
        request.tensor.CopyFrom(image)
    elif isinstance(image, bytes):
        request.encoded = image
    else:
        request.pixels.CopyFrom(pb.RawImage(height=image[0], width=image[1], pixels=image[2],
                                            format=image[3] if len(image) > 3 else 0,
                                            step=image[4] if len(image) > 3 else 0))
    return request


# output.regions on top of ``requests`` (whose spaces 0..5 include NO_MAP, 4)
region_options = st.builds(
    pb.RegionOptions, enabled=st.booleans(),
    threshold=st.one_of(st.floats(-1, 2, width=32),
                        st.sampled_from([0.0, 1.0, float("nan"), float("inf")])),
    max_regions=st.integers(0, 300),
    min_area=st.one_of(st.floats(-10, 1e4, width=32), st.just(float("nan"))))


def _with_regions(request: pb.ExplainRequest, regions: pb.RegionOptions) -> pb.ExplainRequest:
    request.output.regions.CopyFrom(regions)
    return request


@FUZZ
@given(st.builds(_with_regions, requests, region_options))
def test_requests_get_an_answer_or_a_clear_error(service, request):
    try:
        response = service.explain(request)
    except CamserveError as exc:
        assert str(exc)
        return
    assert response.targets
    width = response.geometry.original_width
    height = response.geometry.original_height
    for target in response.targets:
        assert 0 <= target.class_index < 10
        assert target.HasField("cam") == (request.output.space != pb.NO_MAP)
        assert len(target.regions) <= (request.output.regions.max_regions or 16)
        assert request.output.regions.enabled or not target.regions
        peaks = [r.peak for r in target.regions]
        assert peaks == sorted(peaks, reverse=True)
        for r in target.regions:
            assert 0 <= r.box.x0 < r.box.x1 <= width and 0 <= r.box.y0 < r.box.y1 <= height
            assert r.area >= request.output.regions.min_area and r.polygon
