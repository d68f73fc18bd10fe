"""``resize_on_client``: the SDK resizes a large image to the model's ``resize`` (the server's
antialiased resampling, ``camserve.explain.image.resample``), sends it as a small RGB8 frame
and maps the answer back onto the caller's full-size image.

Live server, tiny model (64x64 input, resize 73). Measured on a 480x640 frame: the maps on
the caller's grid agree with the server-side preprocessing's to max |difference| 0.010
(RGB8 and BGR8 arrays, an NV12 frame, JPEG bytes; float16 maps; the pre-resized frame is
rounded to uint8 once more). The request shrinks to a 73x97 RGB8 frame, 21 KB: from 922 KB
(RGB8, BGR8), 461 KB (NV12) and 125 KB (JPEG quality 95).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camserve.client import Client, Frame
from camserve.client.options import client_resized
from camserve.contract import Preprocessing
from camserve.errors import CallerError
from camserve.explain.geometry import Geometry, to_original
from camserve.v1 import explainer_pb2 as pb

HEIGHT, WIDTH = 480, 640
ATOL = 0.05  # measured max 0.010: uint8 rounding of the pre-resized frame


def _frame(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A smooth textured RGB frame with a bright square (deterministic)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 60 * np.sin(xx / 23.0), 128 + 60 * np.cos(yy / 17.0),
                    128 + 40 * np.sin((xx + yy) / 31.0)], axis=-1)
    rgb[height // 3:height // 3 + 80, width // 2:width // 2 + 80] = 250
    rgb += np.random.default_rng(0).normal(0, 6, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


class Recorder:
    """The client's Explain call (the bytes it serializes itself) and its stub's GetModel,
    recording the requests sent (as parsed from those bytes) and the GetModel calls."""

    def __init__(self, explain, stub) -> None:
        self.explain, self.stub, self.sent, self.model_calls = explain, stub, [], 0

    def __call__(self, request: bytes, **kwargs):
        self.sent.append(pb.ExplainRequest.FromString(request))
        return self.explain(request, **kwargs)

    def GetModel(self, request, **kwargs):
        self.model_calls += 1
        return self.stub.GetModel(request, **kwargs)


@pytest.fixture()
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client._stub = client._explain_wire = Recorder(client._explain_wire, client._stub)
        yield client


def _inputs(rgb: np.ndarray) -> dict[str, tuple[object, dict]]:
    """The same picture as each kind of input: (image, extra explain options)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    nv12 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)  # I420 planes -> NV12's interleaved UV
    h, w = rgb.shape[:2]
    u, v = nv12[h:h + h // 4].reshape(h // 2, w // 2), nv12[h + h // 4:].reshape(h // 2, w // 2)
    nv12 = np.concatenate([nv12[:h], np.stack([u, v], axis=-1).reshape(h // 2, w)])
    jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    return {"rgb8 array": (rgb, {}), "bgr8 array": (bgr, {"pixel_format": "bgr8"}),
            "nv12 frame": (Frame.from_array(nv12, "nv12"), {}), "jpeg bytes": (jpeg, {})}


@pytest.mark.parametrize("kind", ["rgb8 array", "bgr8 array", "nv12 frame", "jpeg bytes"])
def test_maps_agree_with_server_side_resizing_on_the_callers_grid(client, kind):
    image, extra = _inputs(_frame())[kind]
    plain = client.explain(image, top_k=2, **extra)
    resized = client.explain(image, top_k=2, resize_on_client=True, **extra)
    full, small = client._stub.sent
    assert [e.class_index for e in resized] == [e.class_index for e in plain]
    expected = Geometry.for_image(HEIGHT, WIDTH, 73, (64, 64))
    for a, b in zip(plain, resized):
        assert a.geometry == b.geometry == expected  # original: the caller's size
        assert b.cam.shape == (HEIGHT, WIDTH)
        difference = np.abs(a.cam - b.cam).max()
        print(f"\n{kind}: max |map difference| {difference:.4f}; request "
              f"{full.ByteSize()} -> {small.ByteSize()} bytes")
        assert difference <= ATOL
    # a 73 x 97 RGB8 frame instead of the full picture
    assert (small.pixels.height, small.pixels.width) == expected.resized
    assert small.ByteSize() < (0.2 if kind == "jpeg bytes" else 0.05) * full.ByteSize()
    assert client._stub.model_calls == 1  # the model's preprocessing, read once


def test_a_hot_square_lands_where_it_does_without_client_resize(client):
    """The same model-input map, mapped onto the photo with the resized call's geometry and
    with one-step geometry, lands on the same pixels; both where the square was."""
    resized = client.explain(_frame(), resize_on_client=True)[0]
    reference = Geometry.for_image(HEIGHT, WIDTH, 73, (64, 64))
    square = np.zeros((64, 64), np.float32)
    square[20:30, 30:44] = 1.0
    ours = np.argwhere(to_original(square, resized.geometry) > 0.5)
    theirs = np.argwhere(to_original(square, reference) > 0.5)
    np.testing.assert_allclose(ours.min(0), theirs.min(0), atol=2)
    np.testing.assert_allclose(ours.max(0), theirs.max(0), atol=2)
    # model input row r, col c -> resized (r + y0, c + x0) -> photo * (H0 / Hr, W0 / Wr)
    x0, y0, _, _ = reference.crop
    sy, sx = HEIGHT / reference.resized[0], WIDTH / reference.resized[1]
    np.testing.assert_allclose(ours.min(0), ((20 + y0) * sy, (30 + x0) * sx), atol=2 + sx)
    np.testing.assert_allclose(ours.max(0) + 1, ((30 + y0) * sy, (44 + x0) * sx), atol=2 + sx)


def test_regions_are_in_the_callers_pixels(client):
    """With a map, the regions are found on the caller's grid (what ``regions()`` finds on the
    same map); without one (space "none"), the server's are scaled: the strongest regions
    box for box, within a sent pixel."""
    options = {"resize_on_client": True, "regions": True, "region_threshold": 0.7,
               "max_regions": 3, "min_area": 10.0}
    found = client.explain(_frame(), **options)[0]
    ours = found.regions(0.7, max_regions=3, min_area=10.0)
    assert found.server_regions and len(found.server_regions) == len(ours)
    for server, here in zip(found.server_regions, ours):
        assert server.box == here.box and server.area == here.area
    scaled = client.explain(_frame(), space="none", **options)[0].server_regions
    assert len(scaled) == len(ours)
    scale = WIDTH / found.geometry.resized[1]  # 6.6 photo pixels per sent pixel
    for server, here in zip(scaled, ours):
        print(f"\nscaled {server.box} {server.area:.0f}, here {here.box} {here.area:.0f}")
        np.testing.assert_allclose(server.box, here.box, atol=scale + 2)
        assert 0.5 * here.area <= server.area <= 1.1 * here.area
        assert server.peak == pytest.approx(here.peak, abs=0.01)


def test_small_images_are_sent_as_they_are(client):
    photo = _frame(60, 50)  # shorter side 50 < 73: never upscaled
    client.explain(photo, resize_on_client=True)
    client.explain(cv2.imencode(".png", photo)[1].tobytes(), resize_on_client=True)
    array, encoded = client._stub.sent
    assert (array.pixels.height, array.pixels.width) == (60, 50)
    assert encoded.WhichOneof("image") == "encoded"
    spec = Preprocessing(resize=73, crop=(64, 64))
    assert client_resized(photo, spec) is None
    frame, original = client_resized(_frame(), spec)
    assert (frame.height, frame.width, frame.pixel_format) == (73, 97, "rgb8")
    assert original == (HEIGHT, WIDTH)


def test_only_explain_can_resize():
    with pytest.raises(CallerError, match="resize_on_client needs the model's preprocessing"):
        Client.request(_frame(), resize_on_client=True)
