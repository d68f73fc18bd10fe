"""Raw camera frames (``RawImage``: height, width, pixels, format, step) -> uint8 RGB [H,W,3].

One table, ``LAYOUTS``, says how each ``PixelFormat`` lays out its bytes, which OpenCV code
turns it into RGB and which sizes it needs; the server's ``ModelInfo.pixel_formats``, the
SDK's ``Frame`` and its ROS 2 encodings all read it.

    format  ROS 2 encoding  row of W pixels  planes after the H rows    sizes
    RGB8    rgb8            3W               -                          any
    BGR8    bgr8            3W               -                          any
    RGBA8   rgba8           4W (alpha ignored)                          any
    BGRA8   bgra8           4W (alpha ignored)                          any
    MONO8   mono8           W                -                          any
    YUYV    yuv422_yuy2     2W (Y0 U Y1 V)   -                          even W
    NV12    nv12            W (Y)            H/2 rows of step: U V U V  even W, H
    I420    i420            W (Y)            H/2 rows of step/2: U,     even W, H, step
                                             then H/2 rows of step/2: V

``step`` is the bytes from one row's start to the next (0: the packed row above); bytes
after a row's pixels are padding and are ignored. The byte count (``frame_bytes``, the one
place it is computed) is exactly

    packed formats   height * step
    NV12             height * step + height/2 * step           (= 1.5 * height * step)
    I420             height * step + 2 * (height/2 * step/2)   (= 1.5 * height * step)

the size of ROS 2's ``data`` (``step * rows``): a last row without its padding is refused,
as are any extra bytes, with a message naming the count. Everything is checked from the
header fields before a byte is read: the format, an empty size, ``max_pixels`` (the
``LimitError`` of encoded images), a step shorter than the packed row, odd sizes of formats
that share chroma between pixels, then the byte count.

RGB8 comes back as a read-only view of ``data`` (no copy, also with a padded step); the
others are converted by OpenCV reading views of ``data`` (a padded I420 frame copies its
chroma planes once, interleaved, for ``cvtColorTwoPlane``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from camserve.errors import CallerError, LimitError
from camserve.explain.image import DEFAULT_MAX_PIXELS, ImageError
from camserve.v1 import explainer_pb2 as pb


@dataclass(frozen=True)
class PixelLayout:
    """How one ``PixelFormat`` holds a frame of height x width pixels.

    A row of the frame (of its Y plane, for planar formats) is ``width * sample_bytes``
    bytes, viewed as [width, channels]. ``chroma`` has one entry per chroma plane after the
    H rows: its rows are ``step // divisor`` bytes and there are height/2 of them.
    """

    value: int                  # the pb.PixelFormat value
    name: str                   # the SDK's name: the enum name in lower case
    encodings: tuple[str, ...]  # ROS 2 sensor_msgs/Image encodings with this layout
    sample_bytes: int           # bytes per pixel of a (Y) row
    channels: int               # of the [H,W,C] view of a packed row
    code: int | None            # cv2.cvtColor code to RGB; None: already RGB
    chroma: tuple[int, ...] = ()  # step divisor of each chroma plane (planar formats)
    even_width: bool = False
    even_height: bool = False

    @property
    def label(self) -> str:
        """The proto's name, e.g. "NV12"."""
        return pb.PixelFormat.Name(self.value)

    def row_bytes(self, width: int) -> int:
        """The packed row (of the Y plane): the smallest step."""
        return width * self.sample_bytes


# The formats, in the proto's order: the one table of what each holds.
TABLE: tuple[PixelLayout, ...] = (
    PixelLayout(pb.RGB8, "rgb8", ("rgb8",), 3, 3, None),
    PixelLayout(pb.BGR8, "bgr8", ("bgr8",), 3, 3, cv2.COLOR_BGR2RGB),
    PixelLayout(pb.RGBA8, "rgba8", ("rgba8",), 4, 4, cv2.COLOR_RGBA2RGB),
    PixelLayout(pb.BGRA8, "bgra8", ("bgra8",), 4, 4, cv2.COLOR_BGRA2RGB),
    PixelLayout(pb.MONO8, "mono8", ("mono8",), 1, 1, cv2.COLOR_GRAY2RGB),
    PixelLayout(pb.YUYV, "yuyv", ("yuv422_yuy2", "yuyv"), 2, 2, cv2.COLOR_YUV2RGB_YUYV,
                even_width=True),
    PixelLayout(pb.NV12, "nv12", ("nv12",), 1, 1, cv2.COLOR_YUV2RGB_NV12, chroma=(1,),
                even_width=True, even_height=True),
    PixelLayout(pb.I420, "i420", ("i420",), 1, 1, cv2.COLOR_YUV2RGB_I420, chroma=(2, 2),
                even_width=True, even_height=True),
)

# pb.PixelFormat value -> layout; PIXEL_FORMAT_UNSPECIFIED (0, a request without a format)
# is RGB8, today's packed RGB.
LAYOUTS: dict[int, PixelLayout] = {layout.value: layout for layout in TABLE}
LAYOUTS[pb.PIXEL_FORMAT_UNSPECIFIED] = LAYOUTS[pb.RGB8]

# The formats a server accepts (ModelInfo.pixel_formats), in the proto's order.
PIXEL_FORMATS: tuple[int, ...] = tuple(layout.value for layout in TABLE)


def known_formats() -> str:
    """"RGB8 (0 or 1), BGR8 (2), ..." for error messages."""
    return ", ".join(f"{layout.label} ({'0 or ' if layout.value == pb.RGB8 else ''}"
                     f"{layout.value})" for layout in TABLE)


def layout_of(pixel_format: int | str, field: str = "pixels.format") -> PixelLayout:
    """The layout of a pb.PixelFormat value, or of a name: "nv12", "NV12", or a ROS 2
    encoding ("yuv422_yuy2"). Anything else (a newer client's value) is a CallerError
    naming ``field`` and listing the known formats."""
    if isinstance(pixel_format, str):
        key = pixel_format.strip().lower()
        for layout in TABLE:
            if key == layout.name or key in layout.encodings:
                return layout
        raise CallerError(f"{field} {pixel_format!r} is not a pixel format camserve knows; "
                          f"known: {', '.join(layout.name for layout in TABLE)}")
    layout = LAYOUTS.get(int(pixel_format))
    if layout is None:
        raise CallerError(f"{field} {pixel_format} is not a pixel format this server knows; "
                          f"known: {known_formats()}")
    return layout


def frame_bytes(layout: PixelLayout, height: int, step: int) -> int:
    """The exact byte count of a frame: ``height`` rows of ``step`` bytes, then for planar
    formats height/2 rows of ``step // divisor`` bytes per chroma plane."""
    return height * step + sum((height // 2) * (step // d) for d in layout.chroma)


def declared_bytes(height: int, width: int, pixel_format: int, step: int = 0) -> int:
    """The bytes a raw frame's header declares (what ``check_frame`` then requires of its
    pixels), without reading the pixels: reading the field copies it, and protobuf's
    ``ByteSize()`` encodes the whole message. 0 for a format this server does not know
    (decoding refuses it)."""
    layout = LAYOUTS.get(int(pixel_format))
    if layout is None:
        return 0
    return frame_bytes(layout, height, step or layout.row_bytes(width))


def _formula(layout: PixelLayout, height: int, step: int) -> str:
    """``frame_bytes`` in words, for the message of a wrong byte count."""
    planes = [f"{height} rows of {step} bytes"]
    planes += [f"{height // 2} rows of {step // d} bytes" for d in layout.chroma]
    return " + ".join(planes)


def check_frame(height: int, width: int, size: int, pixel_format: int | str, step: int = 0,
                max_pixels: int | None = DEFAULT_MAX_PIXELS,
                field: str = "pixels") -> tuple[PixelLayout, int]:
    """Check a frame's fields against its byte count ``size`` without reading a byte; returns
    its layout and its step (0 resolved to the packed row). ``max_pixels`` None: no limit.
    Errors name ``field``'s members (``pixels.step``...), as the request spells them."""
    layout = layout_of(pixel_format, f"{field}.format")
    if height <= 0 or width <= 0:
        raise ImageError(f"raw image size {height}x{width} is empty ({field}.height and "
                         f"{field}.width must be > 0)")
    if max_pixels is not None and height * width > max_pixels:
        raise LimitError(f"the raw image has {width}x{height} pixels; the limit is "
                         f"{max_pixels} pixels")
    row = layout.row_bytes(width)
    step = step or row
    if step < row:
        raise ImageError(f"{field}.step {step} is shorter than a packed {layout.label} row of "
                         f"{width} pixels: at least {row} bytes (0: packed)")
    if (layout.even_width and width % 2) or (layout.even_height and height % 2):
        sizes = "width and height" if layout.even_height else "width"
        raise ImageError(f"{layout.label} shares chroma between neighbouring pixels: its "
                         f"{sizes} must be even, got {width}x{height}")
    odd = [d for d in layout.chroma if step % d]
    if odd:
        raise ImageError(f"{field}.step {step} is odd: {layout.label}'s chroma rows are "
                         f"step/{odd[0]} bytes, so step must be even")
    expected = frame_bytes(layout, height, step)
    if size != expected:
        raise ImageError(f"{field}.pixels: a {height}x{width} {layout.label} frame with step "
                         f"{step} ({_formula(layout, height, step)}) needs {expected} bytes, "
                         f"got {size}")
    return layout, step


def frame_to_rgb(height: int, width: int, data: bytes | memoryview,
                 pixel_format: int | str = pb.RGB8,
                 step: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 field: str = "pixels") -> np.ndarray:
    """A raw frame -> uint8 RGB [height, width, 3] (a read-only view of ``data`` for RGB8).

    ``data``: ``frame_bytes`` bytes as the module docstring lays out; ``pixel_format``: a
    pb.PixelFormat value (0: RGB8) or a name; ``step``: bytes per row (0: packed).
    """
    layout, step = check_frame(height, width, len(data), pixel_format, step, max_pixels,
                               field)
    buffer = np.frombuffer(data, dtype=np.uint8)
    row = layout.row_bytes(width)
    if not layout.chroma:  # packed: [H, step] -> [H, W, C], a view either way
        view = buffer.reshape(height, step)[:, :row].reshape(height, width, layout.channels)
        return view if layout.code is None else cv2.cvtColor(view, layout.code)
    if layout.value == pb.I420 and step != width:
        # OpenCV's one-buffer I420 assumes packed chroma rows: interleave U and V once and
        # read the Y plane in place.
        half, chroma_step = height // 2, step // 2
        planes = buffer[height * step:].reshape(2, half, chroma_step)[:, :, :width // 2]
        uv = np.empty((half, width // 2, 2), np.uint8)
        uv[..., 0], uv[..., 1] = planes
        luma = buffer[:height * step].reshape(height, step)[:, :width]
        return cv2.cvtColorTwoPlane(luma, uv, cv2.COLOR_YUV2RGB_NV12)
    # NV12 (chroma rows are `step` bytes too) and packed I420: OpenCV's [H * 3/2, W] view
    rows = buffer.reshape(height * 3 // 2, step)[:, :width]
    return cv2.cvtColor(rows, layout.code)
