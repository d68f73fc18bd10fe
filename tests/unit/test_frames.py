"""Raw camera frames: every PixelFormat built from one RGB picture with OpenCV's own forward
conversions, decoded by ``camserve.explain.frames`` exactly as OpenCV decodes the same bytes,
padded steps, every refused frame's message, and the SDK's ``Frame`` (ROS 2 images, arrays)."""

from __future__ import annotations

import array
import base64
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from camserve.client import Client, ExplainOptions, Frame
from camserve.client.models import model_info
from camserve.errors import CallerError, LimitError
from camserve.explain.frames import (
    LAYOUTS,
    PIXEL_FORMATS,
    TABLE,
    declared_bytes,
    frame_bytes,
    frame_to_rgb,
    layout_of,
)
from camserve.explain.image import ImageError
from camserve.v1 import explainer_pb2 as pb

H, W = 30, 40  # H/2 = 15 rows of chroma: odd, and H is not a multiple of 4


def _picture(seed: int = 0, height: int = H, width: int = W) -> np.ndarray:
    """Smooth RGB uint8 [H,W,3], constant over each 2x2 block: 4:2:0 and 4:2:2 chroma then
    lose nothing, and YUV round trips differ from it by rounding only."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    half = cv2.resize(small, (width // 2, height // 2), interpolation=cv2.INTER_LINEAR)
    return half.repeat(2, axis=0).repeat(2, axis=1)


def _planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y [H,W], U [H/2,W/2], V [H/2,W/2] of OpenCV's RGB -> I420."""
    height, width = rgb.shape[:2]
    flat = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).ravel()
    quarter = height * width // 4
    y = flat[:height * width].reshape(height, width)
    u = flat[height * width:height * width + quarter].reshape(height // 2, width // 2)
    v = flat[height * width + quarter:].reshape(height // 2, width // 2)
    return y, u, v


def build(name: str, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the frame as OpenCV holds it, OpenCV's own decode of it to RGB)."""
    alpha = np.random.default_rng(9).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    if name == "rgb8":
        return rgb, rgb
    if name == "bgr8":
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        return bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if name in ("rgba8", "bgra8"):
        four = cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA if name == "rgba8" else cv2.COLOR_RGB2BGRA)
        four[..., 3] = alpha  # ignored
        return four, cv2.cvtColor(four, cv2.COLOR_RGBA2RGB if name == "rgba8"
                                  else cv2.COLOR_BGRA2RGB)
    if name == "mono8":
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return grey, cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    if name == "i420":
        i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
        return i420, cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)
    y, u, v = _planes(rgb)
    if name == "nv12":  # the I420 planes with U and V interleaved
        nv12 = np.concatenate([y, np.stack([u, v], axis=-1).reshape(len(u), -1)])
        return nv12, cv2.cvtColor(nv12, cv2.COLOR_YUV2RGB_NV12)
    assert name == "yuyv"  # Y0 U Y1 V: each pair shares its block's U and V
    yuyv = np.empty((*y.shape, 2), np.uint8)
    yuyv[..., 0] = y
    yuyv[:, 0::2, 1] = u.repeat(2, axis=0)
    yuyv[:, 1::2, 1] = v.repeat(2, axis=0)
    return yuyv, cv2.cvtColor(yuyv, cv2.COLOR_YUV2RGB_YUYV)


def pad(packed: bytes, name: str, height: int, width: int, step: int, seed: int = 1) -> bytes:
    """The packed frame's rows laid out ``step`` bytes apart (I420 chroma: step/2), the
    padding random."""
    row = width * {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "yuyv": 2}.get(name, 1)
    runs = [(height, row, step)]
    if name == "nv12":
        runs.append((height // 2, width, step))
    if name == "i420":
        runs += [(height // 2, width // 2, step // 2)] * 2
    rng = np.random.default_rng(seed)
    out, offset = bytearray(), 0
    for count, size, stride in runs:
        for _ in range(count):
            out += packed[offset:offset + size]
            out += rng.integers(0, 256, stride - size, dtype=np.uint8).tobytes()
            offset += size
    assert offset == len(packed)
    return bytes(out)


NAMES = [layout.name for layout in TABLE]
YUV = {"yuyv", "nv12", "i420"}


def test_the_table_covers_every_proto_format():
    assert set(PIXEL_FORMATS) == set(pb.PixelFormat.values()) - {pb.PIXEL_FORMAT_UNSPECIFIED}
    assert LAYOUTS[pb.PIXEL_FORMAT_UNSPECIFIED] is LAYOUTS[pb.RGB8]
    assert NAMES == ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "yuyv", "nv12", "i420"]
    assert layout_of("yuv422_yuy2") is layout_of(pb.YUYV) is layout_of("YUYV")
    layout = layout_of("i420")
    assert frame_bytes(layout, 4, 8) == 4 * 8 + 2 * 2 * 4 == 48
    assert declared_bytes(4, 6, 99) == 0  # a newer client's format: decoding refuses it


@pytest.mark.parametrize("name", NAMES)
def test_every_format_decodes_as_opencv_does(name):
    rgb = _picture()
    frame, opencv = build(name, rgb)
    value = layout_of(name).value
    for pixel_format in (value, name):
        decoded = frame_to_rgb(H, W, frame.tobytes(), pixel_format)
        assert decoded.shape == (H, W, 3) and decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, opencv)
    if name == "mono8":
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        np.testing.assert_array_equal(decoded, np.repeat(grey[..., None], 3, axis=2))
    else:  # YUV: the colours differ from the original by rounding only
        error = np.abs(decoded.astype(int) - rgb).max()
        assert error <= (3 if name in YUV else 0), error


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("extra", [1, 2, 64])
def test_padded_steps_give_the_pixels_of_the_packed_frame(name, extra):
    frame, opencv = build(name, _picture(1))
    row = frame.shape[1] * (frame.shape[2] if frame.ndim == 3 else 1)
    if name == "i420" and extra % 2:
        extra += 1  # I420's chroma rows are step/2: the step is even
    step = row + extra
    padded = pad(frame.tobytes(), name, H, W, step)
    value = layout_of(name).value
    assert len(padded) == frame_bytes(layout_of(name), H, step) == declared_bytes(H, W, value,
                                                                                  step)
    assert len(frame.tobytes()) == declared_bytes(H, W, value)  # step 0: packed
    np.testing.assert_array_equal(frame_to_rgb(H, W, padded, name, step), opencv)
    # step = the packed row is the packed frame
    np.testing.assert_array_equal(frame_to_rgb(H, W, frame.tobytes(), name, row), opencv)


def test_rgb8_is_a_view_of_the_bytes():
    rgb = _picture(2)
    for data, step in ((rgb.tobytes(), 0), (pad(rgb.tobytes(), "rgb8", H, W, W * 3 + 5), W * 3 + 5)):
        for pixel_format in (pb.PIXEL_FORMAT_UNSPECIFIED, pb.RGB8):
            out = frame_to_rgb(H, W, data, pixel_format, step)
            assert np.shares_memory(out, np.frombuffer(data, np.uint8))
            assert not out.flags.writeable
            np.testing.assert_array_equal(out, rgb)


def test_odd_sizes_where_chroma_allows_them():
    rgb = _picture(3, 8, 10)[:7, :9]  # 7x9
    np.testing.assert_array_equal(frame_to_rgb(7, 9, rgb.tobytes(), pb.RGB8), rgb)
    grey = rgb[..., 0].copy()
    assert frame_to_rgb(7, 9, grey.tobytes(), pb.MONO8).shape == (7, 9, 3)
    yuyv, opencv = build("yuyv", _picture(3, 8, 10))
    odd_height = yuyv[:7]  # YUYV needs an even width only
    np.testing.assert_array_equal(frame_to_rgb(7, 10, odd_height.tobytes(), pb.YUYV),
                                  opencv[:7])


# (height, width, byte count, format, step, max_pixels) -> error class, message pattern
BAD = {
    "unknown format (a newer client's)": (
        (4, 4, 48, 42, 0, None), CallerError,
        (r"pixels\.format 42 is not a pixel format.*known: RGB8 \(0 or 1\), BGR8 \(2\).*"
         r"NV12 \(7\), I420 \(8\)")),
    "empty height": ((0, 4, 0, pb.RGB8, 0, None), ImageError, r"size 0x4 is empty"),
    "empty width": ((4, 0, 0, pb.NV12, 0, None), ImageError, r"size 4x0 is empty"),
    "over the pixel limit": ((4, 4, 48, pb.RGB8, 0, 15), LimitError,
                             r"4x4 pixels; the limit is 15 pixels"),
    "step shorter than the row": ((4, 4, 48, pb.RGB8, 11, None), ImageError,
                                  r"pixels\.step 11 is shorter .* at least 12 bytes"),
    "step shorter than a YUYV row": ((4, 4, 32, pb.YUYV, 7, None), ImageError,
                                     r"pixels\.step 7 .* at least 8 bytes"),
    "NV12 odd width": ((4, 5, 30, pb.NV12, 0, None), ImageError,
                       r"NV12 shares chroma .* width and height must be even, got 5x4"),
    "NV12 odd height": ((5, 4, 30, pb.NV12, 0, None), ImageError,
                        r"NV12 shares chroma .* must be even, got 4x5"),
    "I420 odd height": ((3, 4, 18, pb.I420, 0, None), ImageError,
                        r"I420 shares chroma .* must be even"),
    "YUYV odd width": ((2, 3, 12, pb.YUYV, 0, None), ImageError,
                       r"YUYV shares chroma .* its width must be even, got 3x2"),
    "I420 odd step": ((4, 4, 30, pb.I420, 5, None), ImageError,
                      r"pixels\.step 5 is odd: I420's chroma rows are step/2 bytes"),
    "RGB8 one byte short": ((3, 4, 35, pb.RGB8, 0, None), ImageError,
                            (r"pixels\.pixels: a 3x4 RGB8 frame with step 12 \(3 rows of 12 "
                             r"bytes\) needs 36 bytes, got 35")),
    "RGB8 extra bytes": ((3, 4, 37, pb.RGB8, 0, None), ImageError, r"needs 36 bytes, got 37"),
    "last row without its padding": ((3, 4, 2 * 16 + 12, pb.RGB8, 16, None), ImageError,
                                     r"step 16 \(3 rows of 16 bytes\) needs 48 bytes, got 44"),
    "NV12 without chroma": ((4, 4, 16, pb.NV12, 0, None), ImageError,
                            (r"4x4 NV12 frame with step 4 \(4 rows of 4 bytes \+ 2 rows of 4 "
                             r"bytes\) needs 24 bytes, got 16")),
    "I420 padded, long": ((4, 4, 50, pb.I420, 8, None), ImageError,
                          (r"\(4 rows of 8 bytes \+ 2 rows of 4 bytes \+ 2 rows of 4 bytes\) "
                           r"needs 48 bytes, got 50")),
    "I420 padded, short": ((4, 4, 47, pb.I420, 8, None), ImageError, r"needs 48 bytes, got 47"),
    "BGRA8 as BGR8 bytes": ((2, 2, 12, pb.BGRA8, 0, None), ImageError,
                            r"BGRA8 frame with step 8 .* needs 16 bytes, got 12"),
    "MONO8 given RGB bytes": ((2, 2, 12, pb.MONO8, 0, None), ImageError,
                              r"needs 4 bytes, got 12"),
}


class _Unreadable:
    """Has a length and no bytes: decoding must refuse from the fields alone."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


@pytest.mark.parametrize("case", list(BAD))
def test_bad_frames_are_refused_before_a_byte_is_read(case):
    (height, width, size, pixel_format, step, limit), kind, pattern = BAD[case]
    with pytest.raises(kind, match=pattern):
        frame_to_rgb(height, width, _Unreadable(size), pixel_format, step, max_pixels=limit)
    with pytest.raises(kind, match=pattern):  # and with real bytes
        frame_to_rgb(height, width, b"\0" * size, pixel_format, step, max_pixels=limit)


def test_the_limit_is_checked_before_the_byte_count():
    with pytest.raises(LimitError):
        frame_to_rgb(7000, 7000, b"", pb.NV12, max_pixels=36_000_000)


# --- the SDK's Frame ------------------------------------------------------------------------

def _ros(name: str, encoding: str, step_extra: int = 0) -> dict:
    frame, _ = build(name, _picture(4))
    row = frame.shape[1] * (frame.shape[2] if frame.ndim == 3 else 1)
    return {"header": {"frame_id": "camera"}, "height": H, "width": W, "encoding": encoding,
            "is_bigendian": 0, "step": row + step_extra,
            "data": pad(frame.tobytes(), name, H, W, row + step_extra)}


@pytest.mark.parametrize("name,encoding", [(layout.name, encoding) for layout in TABLE
                                           for encoding in layout.encodings])
def test_frame_from_ros(name, encoding):
    message = _ros(name, encoding, step_extra=2)
    frame = Frame.from_ros(message)
    assert (frame.pixel_format, frame.height, frame.width, frame.step) == \
        (name, H, W, message["step"])
    raw = Client.request(frame).pixels
    assert raw.format == (0 if name == "rgb8" else layout_of(name).value)
    assert (raw.height, raw.width, raw.step, raw.pixels) == (H, W, message["step"],
                                                             message["data"])
    _, opencv = build(name, _picture(4))
    np.testing.assert_array_equal(frame.to_rgb(), opencv)
    # a message object (rclpy's Image: data an array.array of uint8), or rosbridge's JSON
    # (data as base64), or the mapping given straight to the client
    as_object = SimpleNamespace(**{**message, "data": array.array("B", message["data"])})
    assert Frame.from_ros(as_object) == frame
    as_json = {**message, "data": base64.b64encode(message["data"]).decode()}
    assert Frame.from_ros(as_json) == frame
    assert Client.request(message).pixels == raw


def test_frame_from_ros_refusals():
    message = _ros("rgb8", "rgb8")
    with pytest.raises(CallerError, match=r"'yuv422' is not supported; supported: rgb8, bgr8, "
                                          r"rgba8, bgra8, mono8, yuv422_yuy2, yuyv, nv12, i420"):
        Frame.from_ros({**message, "encoding": "yuv422"})  # UYVY in ROS: not YUYV
    with pytest.raises(CallerError, match="needs the field 'encoding'"):
        Frame.from_ros({k: v for k, v in message.items() if k != "encoding"})
    with pytest.raises(CallerError, match=r"frame\.pixels: .* needs 3600 bytes, got 3599"):
        Frame.from_ros({**message, "data": message["data"][:-1]})
    with pytest.raises(CallerError, match="base64"):
        Frame.from_ros({**message, "data": "not base64!"})


@pytest.mark.parametrize("name", NAMES)
def test_arrays_are_sent_as_they_are_in_their_format(name):
    frame, opencv = build(name, _picture(5))
    request = Client.request(frame, pixel_format=name.upper(), top_k=2)
    raw = request.pixels
    assert (raw.height, raw.width, raw.step) == (H, W, 0)
    assert raw.format == (0 if name == "rgb8" else layout_of(name).value)
    assert raw.pixels == frame.tobytes()
    np.testing.assert_array_equal(frame_to_rgb(H, W, raw.pixels, raw.format, raw.step), opencv)
    # a view with padded rows goes packed
    wide = np.zeros((frame.shape[0], frame.shape[1] + 6, *frame.shape[2:]), np.uint8)
    wide[:, :frame.shape[1]] = frame
    assert Client.request(wide[:, :frame.shape[1]], pixel_format=name).pixels == raw


def test_array_shapes_and_options():
    photo = _picture(6)
    assert Client.request(photo).pixels == pb.RawImage(height=H, width=W,
                                                       pixels=photo.tobytes())
    assert ExplainOptions(pixel_format="YUV422_YUY2").pixel_format == "yuyv"
    assert ExplainOptions(pixel_format=pb.NV12).pixel_format == "nv12"
    with pytest.raises(CallerError, match=r"pixel_format 'yuv420' is not a pixel format.*"
                                          r"known: rgb8, bgr8"):
        ExplainOptions(pixel_format="yuv420")
    with pytest.raises(CallerError, match=r"must be BGR uint8 \[H,W,3\] for pixel_format "
                                          r"'bgr8', got uint8 \[30, 40, 4\]"):
        Client.request(np.zeros((H, W, 4), np.uint8), pixel_format="bgr8")
    with pytest.raises(CallerError, match=r"NV12 uint8 \[H\*3/2,W\]"):
        Client.request(np.zeros((31, W), np.uint8), pixel_format="nv12")
    with pytest.raises(CallerError, match="RGB uint8"):
        Client.request(photo.astype(np.float32))
    with pytest.raises(CallerError, match="pixel_format is for image arrays"):
        Client.request(b"\x89PNG...", pixel_format="bgr8")
    nv12 = Frame(bytes(H * W * 3 // 2), H, W, "nv12")
    with pytest.raises(CallerError, match="contradicts the frame's own 'nv12'"):
        Client.request(nv12, pixel_format="bgr8")
    assert Client.request(nv12, pixel_format="nv12").pixels.format == pb.NV12
    with pytest.raises(CallerError, match=r"frame\.step 3 is shorter"):
        Frame(bytes(12), 2, 2, "rgb8", step=3)
    with pytest.raises(CallerError, match=r"height must be an int >= 0"):
        Frame(bytes(12), -2, 2)


def test_model_info_lists_format_names():
    message = pb.ModelInfo(name="m", pixel_formats=[*PIXEL_FORMATS, 99])
    assert model_info(message).pixel_formats == (*NAMES, "99")
    assert model_info(pb.ModelInfo(name="old")).pixel_formats == ()
