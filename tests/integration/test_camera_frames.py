"""Raw camera frames through a live server (tiny model): every PixelFormat gives the maps of
the RGB path fed with OpenCV's decode of the same bytes, padded steps change nothing,
GetModel lists the formats, bad frames get INVALID_ARGUMENT naming the field and the byte
count, and the SDK sends arrays, Frames and ROS 2 images as they are."""

from __future__ import annotations

import base64

import cv2
import grpc
import numpy as np
import pytest

from camserve.client import Client, Frame
from camserve.explain.frames import PIXEL_FORMATS, TABLE
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

H, W = 60, 80
NAMES = [layout.name for layout in TABLE]
VALUES = {layout.name: layout.value for layout in TABLE}


def _picture(seed: int = 0) -> np.ndarray:
    """Smooth RGB uint8 [H,W,3], constant over 2x2 blocks (chroma subsampling loses little)."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    half = cv2.resize(small, (W // 2, H // 2), interpolation=cv2.INTER_LINEAR)
    return half.repeat(2, axis=0).repeat(2, axis=1)


def build(name: str, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the frame as OpenCV holds it, made by OpenCV's forward conversions; OpenCV's decode
    of it back to RGB)."""
    if name in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8"):
        forward, back = {"rgb8": (None, None),
                         "bgr8": (cv2.COLOR_RGB2BGR, cv2.COLOR_BGR2RGB),
                         "rgba8": (cv2.COLOR_RGB2RGBA, cv2.COLOR_RGBA2RGB),
                         "bgra8": (cv2.COLOR_RGB2BGRA, cv2.COLOR_BGRA2RGB),
                         "mono8": (cv2.COLOR_RGB2GRAY, cv2.COLOR_GRAY2RGB)}[name]
        if forward is None:
            return rgb, rgb
        frame = cv2.cvtColor(rgb, forward)
        return frame, cv2.cvtColor(frame, back)
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    if name == "i420":
        return i420, cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)
    flat, quarter = i420.ravel(), H * W // 4
    y = flat[:H * W].reshape(H, W)
    u = flat[H * W:H * W + quarter].reshape(H // 2, W // 2)
    v = flat[H * W + quarter:].reshape(H // 2, W // 2)
    if name == "nv12":
        nv12 = np.concatenate([y, np.stack([u, v], axis=-1).reshape(H // 2, W)])
        return nv12, cv2.cvtColor(nv12, cv2.COLOR_YUV2RGB_NV12)
    yuyv = np.empty((H, W, 2), np.uint8)
    yuyv[..., 0], yuyv[:, 0::2, 1], yuyv[:, 1::2, 1] = y, u.repeat(2, 0), v.repeat(2, 0)
    return yuyv, cv2.cvtColor(yuyv, cv2.COLOR_YUV2RGB_YUYV)


def _padded(frame: np.ndarray, name: str, extra: int) -> tuple[bytes, int]:
    """The frame with ``extra`` bytes of junk after each row (I420's chroma rows: half)."""
    rows = frame.reshape(frame.shape[0], -1)
    step = rows.shape[1] + extra
    if name != "i420":
        out = np.full((rows.shape[0], step), 0xEE, np.uint8)
        out[:, :rows.shape[1]] = rows
        return out.tobytes(), step
    flat = frame.ravel()
    y = flat[:H * W].reshape(H, W)
    chroma = flat[H * W:].reshape(H, W // 2)  # U rows then V rows, W/2 bytes each
    out_y = np.full((H, step), 0xEE, np.uint8)
    out_y[:, :W] = y
    out_c = np.full((H, step // 2), 0xEE, np.uint8)
    out_c[:, :W // 2] = chroma
    return out_y.tobytes() + out_c.tobytes(), step


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as sdk:
        yield sdk


def _explain(stub, raw: pb.RawImage) -> pb.ExplainResponse:
    return stub.Explain(pb.ExplainRequest(pixels=raw, top_k=3,
                                          output=pb.OutputOptions(dtype=pb.FLOAT32)),
                        timeout=30)


def _maps(response: pb.ExplainResponse) -> tuple[list[int], np.ndarray]:
    return ([t.class_index for t in response.targets],
            np.stack([np.frombuffer(t.cam.data, np.float32) for t in response.targets]))


def _same(a: pb.ExplainResponse, b: pb.ExplainResponse) -> None:
    classes_a, maps_a = _maps(a)
    classes_b, maps_b = _maps(b)
    assert classes_a == classes_b
    np.testing.assert_allclose(maps_a, maps_b, atol=1e-3)
    assert a.geometry == b.geometry


@pytest.mark.parametrize("name", NAMES)
def test_every_format_explains_as_its_rgb(stub, name):
    rgb = _picture(1)
    frame, opencv = build(name, rgb)
    by_format = _explain(stub, pb.RawImage(height=H, width=W, pixels=frame.tobytes(),
                                           format=VALUES[name]))
    by_rgb = _explain(stub, pb.RawImage(height=H, width=W, pixels=opencv.tobytes()))
    _same(by_format, by_rgb)
    if name not in ("mono8", "yuyv", "nv12", "i420"):  # the same colours: the original's maps
        np.testing.assert_array_equal(opencv, rgb)
    for extra in (2, 64):  # padded rows change nothing
        data, step = _padded(frame, name, extra)
        _same(_explain(stub, pb.RawImage(height=H, width=W, pixels=data,
                                         format=VALUES[name], step=step)), by_format)


def test_get_model_lists_the_formats(stub, client):
    assert list(stub.GetModel(pb.GetModelRequest(), timeout=30).pixel_formats) == \
        list(PIXEL_FORMATS)
    assert client.get_model().pixel_formats == tuple(NAMES)
    assert all(m.pixel_formats == tuple(NAMES) for m in client.list_models())


@pytest.mark.parametrize("name", NAMES)
def test_sdk_sends_arrays_in_their_format(client, name):
    frame, opencv = build(name, _picture(2))
    by_format = client.explain(frame, pixel_format=name, top_k=2)
    by_rgb = client.explain(opencv, top_k=2)
    assert [e.class_index for e in by_format] == [e.class_index for e in by_rgb]
    for a, b in zip(by_format, by_rgb):
        assert a.cam.shape == (H, W)
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-3)


def test_a_ros_image_in_one_call(client):
    rgb = _picture(3)
    bgr, _ = build("bgr8", rgb)
    data, step = _padded(bgr, "bgr8", 4)
    message = {"header": {"frame_id": "front_camera"}, "height": H, "width": W,
               "encoding": "bgr8", "is_bigendian": 0, "step": step, "data": data}
    expected = client.explain(rgb, top_k=2)
    for found in (client.explain(message, top_k=2),
                  client.explain(Frame.from_ros(message), top_k=2),
                  client.explain({**message, "data": base64.b64encode(data).decode()},
                                 top_k=2)):
        assert [e.class_index for e in found] == [e.class_index for e in expected]
        for a, b in zip(found, expected):
            np.testing.assert_allclose(a.cam, b.cam, atol=1e-3)
    # frames of several formats over one stream
    nv12, _ = build("nv12", rgb)
    frames = [Frame(nv12.tobytes(), H, W, "nv12"), Frame.from_ros(message)]
    assert [len(found) for found in client.explain_stream(frames, top_k=2)] == [2, 2]


NV12_BYTES = H * W * 3 // 2  # 7200

BAD = {
    "unknown format": (pb.RawImage(height=H, width=W, pixels=bytes(H * W * 3), format=42),
                       grpc.StatusCode.INVALID_ARGUMENT,
                       ["pixels.format 42", "RGB8 (0 or 1)", "I420 (8)"]),
    "NV12 short": (pb.RawImage(height=H, width=W, pixels=bytes(NV12_BYTES - 1),
                               format=pb.NV12),
                   grpc.StatusCode.INVALID_ARGUMENT,
                   ["pixels.pixels", f"needs {NV12_BYTES} bytes, got {NV12_BYTES - 1}"]),
    "I420 padded, last row unpadded": (
        pb.RawImage(height=H, width=W, pixels=bytes(NV12_BYTES + 88 * H * 3 // 2 - 4),
                    format=pb.I420, step=W + 88),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["pixels.pixels", f"needs {(W + 88) * H * 3 // 2} bytes"]),
    "BGR8 as RGBA8": (pb.RawImage(height=H, width=W, pixels=bytes(H * W * 3),
                                  format=pb.RGBA8),
                      grpc.StatusCode.INVALID_ARGUMENT, [f"needs {H * W * 4} bytes"]),
    "step too short": (pb.RawImage(height=H, width=W, pixels=bytes(H * W * 3),
                                   format=pb.BGR8, step=W * 3 - 1),
                       grpc.StatusCode.INVALID_ARGUMENT,
                       ["pixels.step", f"at least {W * 3} bytes"]),
    "NV12 odd width": (pb.RawImage(height=H, width=W - 1, pixels=bytes(NV12_BYTES),
                                   format=pb.NV12),
                       grpc.StatusCode.INVALID_ARGUMENT, ["chroma", "must be even"]),
    "over the pixel limit": (pb.RawImage(height=7000, width=7000, pixels=b"", format=pb.NV12),
                             grpc.StatusCode.RESOURCE_EXHAUSTED, ["the limit is"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_frames_are_refused_with_the_field_and_byte_count(stub, case):
    raw, code, words = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        _explain(stub, raw)
    assert err.value.code() == code
    for word in words:
        assert word in err.value.details()
