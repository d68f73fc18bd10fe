"""``Frame``: a raw camera frame as a driver or ROS 2 delivers it, sent as one ``RawImage``.

    Frame(data, height, width, "nv12", step=0)        bytes as the camera wrote them
    Frame.from_ros(msg)                               a sensor_msgs/Image (or its dict)
    Frame.from_array(array, "bgr8")                   an OpenCV-shaped array

The SDK never converts colours: the server decodes every format (the table of
``camserve.explain.frames``, which also gives the byte counts checked here before sending).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from camserve.errors import CallerError
from camserve.explain.frames import TABLE, check_frame, frame_to_rgb, layout_of
from camserve.v1 import explainer_pb2 as pb

# What an array of each format looks like (OpenCV's own shapes for YUV).
ARRAY_SHAPES = {"rgb8": "RGB uint8 [H,W,3]", "bgr8": "BGR uint8 [H,W,3]",
                "rgba8": "RGBA uint8 [H,W,4]", "bgra8": "BGRA uint8 [H,W,4]",
                "mono8": "grey uint8 [H,W]", "yuyv": "YUYV uint8 [H,W,2]",
                "nv12": "NV12 uint8 [H*3/2,W]", "i420": "I420 uint8 [H*3/2,W]"}

ROS_ENCODINGS = tuple(encoding for layout in TABLE for encoding in layout.encodings)


@dataclass(frozen=True)
class Frame:
    """``height`` rows of ``step`` bytes (0: packed) in ``pixel_format``: a name ("rgb8",
    "bgr8", "rgba8", "bgra8", "mono8", "yuyv", "nv12", "i420"), a ROS 2 encoding
    ("yuv422_yuy2") or a ``camserve.v1.PixelFormat`` value; kept as the name. The byte count
    is checked when made (``camserve.explain.frames`` gives the rules)."""

    data: bytes
    height: int
    width: int
    pixel_format: str = "rgb8"
    step: int = 0

    def __post_init__(self) -> None:
        layout = layout_of(self.pixel_format, "pixel_format")
        object.__setattr__(self, "pixel_format", layout.name)
        if not isinstance(self.data, bytes):
            object.__setattr__(self, "data", _bytes(self.data))
        for name in ("height", "width", "step"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise CallerError(f"a frame's {name} must be an int >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        check_frame(self.height, self.width, len(self.data), layout.value, self.step,
                    max_pixels=None, field="frame")

    @classmethod
    def from_ros(cls, message: Any) -> Frame:
        """A ROS 2 ``sensor_msgs/Image``, or a mapping with its fields (rosbridge's JSON:
        ``data`` may be base64 text): height, width, encoding, step, data. Encodings:
        rgb8, bgr8, rgba8, bgra8, mono8, yuv422_yuy2 (or yuyv), nv12, i420."""
        def field(name: str) -> Any:
            try:
                return message[name] if isinstance(message, Mapping) else getattr(message, name)
            except (KeyError, AttributeError):
                raise CallerError(f"a sensor_msgs/Image needs the field {name!r}") from None

        encoding = str(field("encoding"))
        if encoding.strip().lower() not in ROS_ENCODINGS:
            raise CallerError(f"ROS image encoding {encoding!r} is not supported; supported: "
                              f"{', '.join(ROS_ENCODINGS)}")
        step = message.get("step", 0) if isinstance(message, Mapping) else field("step")
        return cls(_bytes(field("data")), field("height"), field("width"), encoding, step)

    @classmethod
    def from_array(cls, array: Any, pixel_format: str | int = "rgb8") -> Frame:
        """A uint8 array as OpenCV holds the format: [H,W,3] rgb8/bgr8, [H,W,4] rgba8/bgra8,
        [H,W] mono8, [H,W,2] yuyv, [H*3/2,W] nv12/i420; sent packed, as it is (the Frame
        holds a copy of its bytes)."""
        packed, height, width, name = packed_array(array, pixel_format)
        return cls(packed.tobytes(), height, width, name)

    @property
    def format_value(self) -> int:
        """The ``camserve.v1.PixelFormat`` value."""
        return layout_of(self.pixel_format).value

    def to_proto(self, into: pb.RawImage | None = None, *, with_pixels: bool = True
                 ) -> pb.RawImage:
        """The RawImage, written into ``into`` when given (a request's ``pixels``: no second
        copy of the pixels, as ``CopyFrom`` would make); without ``with_pixels``, its header
        alone (what ``camserve.protowire.with_image`` completes). An rgb8 frame without
        padding leaves format and step unset (the request any camserve server reads)."""
        raw = pb.RawImage() if into is None else into
        write_header(raw, self.height, self.width, self.format_value, self.step)
        if with_pixels:
            raw.pixels = self.data
        return raw

    def to_rgb(self) -> np.ndarray:
        """The frame as uint8 RGB [H,W,3], decoded here as the server does (e.g. to draw an
        ``Explanation.overlay`` on)."""
        return frame_to_rgb(self.height, self.width, self.data, self.format_value, self.step,
                            max_pixels=None, field="frame")


def write_header(raw: pb.RawImage, height: int, width: int, pixel_format: int,
                 step: int = 0) -> None:
    """A RawImage's header fields (RGB8 written as format 0, unset)."""
    raw.height, raw.width, raw.step = height, width, step
    raw.format = 0 if pixel_format == pb.RGB8 else pixel_format


def packed_array(array: Any, pixel_format: str | int = "rgb8"
                 ) -> tuple[np.ndarray, int, int, str]:
    """(a C-contiguous view or copy of ``array``, the frame's height and width, the format's
    name) for a uint8 array as ``Frame.from_array`` takes it; a CallerError for any other
    shape or dtype."""
    name = layout_of(pixel_format, "pixel_format").name
    array = np.asarray(array)
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "yuyv": 2}.get(name)
    shape = array.shape
    if channels is not None:
        ok = array.ndim == 3 and shape[2] == channels
        height, width = shape[:2] if ok else (0, 0)
    elif name == "mono8":
        ok = array.ndim == 2 or (array.ndim == 3 and shape[2] == 1)
        height, width = shape[:2] if ok else (0, 0)
    else:  # nv12, i420: [H * 3/2, W]
        ok = array.ndim == 2 and shape[0] % 3 == 0
        height, width = (shape[0] * 2 // 3, shape[1]) if ok else (0, 0)
    if not ok or array.dtype != np.uint8:
        raise CallerError(f"an image array must be {ARRAY_SHAPES[name]} for pixel_format "
                          f"{name!r}, got {array.dtype} {list(shape)}")
    return np.ascontiguousarray(array), height, width, name


def _bytes(data: Any) -> bytes:
    """bytes of a ROS ``data`` field: bytes-like, array.array('B'), a list of ints, a uint8
    array, or base64 text (rosbridge)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise CallerError("a frame's data given as text must be base64") from None
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise CallerError(f"a frame's data array must be uint8, got {data.dtype}")
        return np.ascontiguousarray(data).tobytes()
    try:
        return bytes(data)
    except (TypeError, ValueError) as exc:
        raise CallerError(f"a frame's data must be bytes, got {type(data).__name__}: "
                          f"{exc}") from None
