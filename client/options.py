"""``ExplainOptions``: every option of one explanation, checked once, and the ExplainRequest it
makes.

``Client.explain``, ``Client.explain_stream`` and ``TritonClient.explain`` all take these as
keywords (``client.explain(photo, top_k=2, method="gradcampp")``) or as one ``options=``
object; the defaults are the core's (``camserve.explain``), so the SDK and the server agree on
what an unset option means.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from camserve import protowire, tensors
from camserve.client.frames import Frame, packed_array, write_header
from camserve.contract import Preprocessing
from camserve.errors import CallerError
from camserve.explain.frames import layout_of
from camserve.explain.geometry import Geometry
from camserve.explain.image import Decoded, Window, declared_size, decode_for, resample
from camserve.explain.methods import DEFAULT_METHOD, FUSIONS
from camserve.explain.regions import DEFAULT_MAX_REGIONS, DEFAULT_THRESHOLD
from camserve.explain.smoothing import NOISE_SIGMA
from camserve.v1 import explainer_pb2 as pb

# The SDK's names for the proto's enums.
_FUSIONS = {name: pb.LayerFusion.Value(name.upper()) for name in FUSIONS}
_BASELINES = {"black": pb.IntegratedGradients.BLACK, "zero": pb.IntegratedGradients.ZERO}
_SPACES = {"model_input": pb.MODEL_INPUT, "feature_map": pb.FEATURE_MAP, "none": pb.NO_MAP}


@dataclass(frozen=True)
class ExplainOptions:
    """What to explain and how; ``to_request`` turns it and an image into an ExplainRequest.

    ``targets``: explicit class indices, explained first, then the ``top_k`` best classes
    (None: 1 without targets, else 0). ``method``: a CAM method the model lists
    (``get_model().methods``). ``layers`` (default: all the model explains) and ``fusion``
    ("mean", "sum", "max") pick and combine layers. ``noise_samples``/``noise_sigma`` (std as
    a fraction of the image's value range) average the map over noisy copies, ``flip`` also
    over mirrored ones, ``seed`` fixes the noise (0: fresh). ``normalize=False`` returns the
    ReLU'd maps unscaled (sent as float32; normalised maps travel as float16).
    ``ig_steps`` (0: the core's ``attributions.IG_STEPS``) and ``ig_baseline`` ("black",
    "zero") tune "integrated_gradients". ``space="feature_map"`` has the server send maps on
    the layer's grid [h,w] instead of the model input [H,W]; ``space="none"`` sends no map
    at all (with ``regions``: a few hundred bytes). ``request_id`` is echoed back.
    ``regions=True`` has the server find each map's regions (``Explanation.server_regions``,
    as ``Explanation.regions`` finds them): at ``region_threshold`` in (0, 1], at most
    ``max_regions`` per target (largest peak first), none smaller than ``min_area`` photo
    pixels (``camserve.explain.regions``: a single pixel has area 0).
    ``pixel_format`` ("bgr8", "nv12"...; None: "rgb8") says how an image array holds its
    pixels; it is sent as they are, in that format (``camserve.client.Frame``).
    ``resize_on_client`` (``Client.explain`` only): an image larger than the model needs is
    resized here as the server would (``client_resized``) and sent as a small RGB8 frame;
    the Explanations still describe the caller's full-size image.
    ``window`` (center, width), for encoded files: the intensity window that maps their
    samples onto 8 bits (``camserve.explain.image.Window``; None: a 16-bit PNG over its own
    min..max, 8-bit files as they are), e.g. (2048, 4096) for a 12-bit X-ray.
    """

    model: str = ""
    targets: Sequence[int] | None = None
    top_k: int | None = None
    method: str = DEFAULT_METHOD
    layers: Sequence[str] = ()
    fusion: str = FUSIONS[0]
    noise_samples: int = 0
    noise_sigma: float = NOISE_SIGMA
    flip: bool = False
    seed: int = 0
    normalize: bool = True
    ig_steps: int = 0  # 0 leaves the field unset on the wire: the server's default
    ig_baseline: str = "black"
    request_id: str = ""
    space: str = "model_input"
    pixel_format: str | None = None  # of an image array; None: rgb8
    regions: bool = False
    region_threshold: float = DEFAULT_THRESHOLD
    max_regions: int = DEFAULT_MAX_REGIONS  # the server's limit: 256
    min_area: float = 0.0
    resize_on_client: bool = False  # Client.explain reads the model's preprocessing
    window: tuple[float, float] | None = None  # (center, width) in the file's sample units

    def __post_init__(self) -> None:
        # Tuples, so that a frozen options object really is immutable (and numpy arrays of
        # class indices work: ``array or []`` would not).
        object.__setattr__(self, "targets",
                           () if self.targets is None else tuple(int(t) for t in self.targets))
        object.__setattr__(self, "layers", tuple(self.layers))
        _choose("fusion", self.fusion, _FUSIONS)
        _choose("ig_baseline", self.ig_baseline, _BASELINES)
        _choose("space", self.space, _SPACES)
        if self.pixel_format is not None:
            object.__setattr__(self, "pixel_format",
                               layout_of(self.pixel_format, "pixel_format").name)
        # unsigned on the wire: protobuf would refuse them with a less helpful message
        for name in ("top_k", "noise_samples", "seed", "ig_steps", "max_regions"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise CallerError(f"{name} must be >= 0, got {value}")
        if not 0 < self.region_threshold <= 1:  # NaN too
            raise CallerError(f"region_threshold is a map level in (0, 1], got "
                              f"{self.region_threshold}")
        if not 0 <= self.min_area < float("inf"):
            raise CallerError(f"min_area is a number of photo pixels >= 0, got {self.min_area}")
        if self.window is not None:
            center, width = self.window
            object.__setattr__(self, "window", (float(center), float(width)))
            Window(*self.window)  # checks it

    @classmethod
    def merged(cls, options: ExplainOptions | None,
               overrides: Mapping[str, Any]) -> ExplainOptions:
        """``options`` (default: all defaults) with ``overrides`` (keyword arguments of
        ``Client.explain``) applied; an unknown keyword is a TypeError, as for a function."""
        if options is None:
            return cls(**overrides)
        return dataclasses.replace(options, **overrides) if overrides else options

    def to_request(self, image: Any = None, tensor: np.ndarray | None = None
                   ) -> pb.ExplainRequest:
        """The ExplainRequest for ``image`` (a file path, encoded JPEG/PNG/WebP/BMP bytes, a
        ``Frame``, a ROS 2 sensor_msgs/Image or its dict, or a uint8 array in
        ``pixel_format``, RGB [H,W,3] by default) or ``tensor`` (preprocessed float32
        [1,3,H,W])."""
        return self.outgoing(image, tensor).to_request()

    def outgoing(self, image: Any = None, tensor: np.ndarray | None = None) -> Outgoing:
        """``to_request``'s request with the image's bytes beside it (``Outgoing``): what
        ``Client`` serializes with one copy of the image."""
        if (image is None) == (tensor is None):
            raise CallerError("give exactly one of image= or tensor=")
        if self.resize_on_client and image is not None:
            raise CallerError("resize_on_client needs the model's preprocessing, which "
                              "Client.explain reads from the server; here the image would "
                              "be sent as it is (resize it with client_resized first)")
        request = pb.ExplainRequest(
            model=self.model, request_id=self.request_id, classes=list(self.targets),
            top_k=self.top_k if self.top_k is not None else (0 if self.targets else 1),
            method=self.method, layers=list(self.layers), fusion=_FUSIONS[self.fusion],
            output=pb.OutputOptions(space=_SPACES[self.space],
                                    dtype=pb.FLOAT16 if self.normalize else pb.FLOAT32),
            smoothing=pb.Smoothing(noise_samples=self.noise_samples,
                                   noise_sigma=self.noise_sigma, horizontal_flip=self.flip,
                                   seed=self.seed),
            raw_maps=not self.normalize,
            integrated_gradients=pb.IntegratedGradients(
                steps=self.ig_steps, baseline=_BASELINES[self.ig_baseline]))
        if self.regions:
            request.output.regions.CopyFrom(pb.RegionOptions(
                enabled=True, threshold=self.region_threshold, max_regions=self.max_regions,
                min_area=self.min_area))
        member, data = _image_parts(request, image, tensor, self.pixel_format)
        if self.window is not None:
            if member != "encoded":
                raise CallerError("window applies to encoded files (a path or JPEG/PNG bytes); "
                                  "arrays, frames and tensors already hold 8-bit or model "
                                  "values")
            request.window.CopyFrom(pb.IntensityWindow(center=self.window[0],
                                                       width=self.window[1]))
        return Outgoing(request, member, data)


@dataclass(frozen=True)
class Outgoing:
    """An ExplainRequest about to be sent, its image's bytes beside it.

    ``request`` has everything but those bytes: for ``member`` "pixels" its RawImage holds
    the frame's header, for "encoded" the field is unset. ``member`` None: ``request`` holds
    its image itself (a tensor, or a message built elsewhere) and ``image`` is empty.
    protobuf would copy the image into the message and again to serialize it;
    ``serialized`` appends it to the serialized rest instead
    (``camserve.protowire.with_image``: one copy).
    """

    request: pb.ExplainRequest
    member: str | None
    image: bytes | memoryview = b""

    def serialized(self) -> bytes:
        """The request's wire bytes, the image in them."""
        head = self.request.SerializeToString()
        return head if self.member is None else protowire.with_image(head, self.member,
                                                                     self.image)

    def to_request(self) -> pb.ExplainRequest:
        """The whole message: ``request`` with the image written into it (a copy)."""
        if self.member == "encoded":
            self.request.encoded = bytes(self.image)
        elif self.member == "pixels":
            self.request.pixels.pixels = bytes(self.image)
        return self.request


@dataclass(frozen=True)
class StreamOptions:
    """Real-time semantics of ``Client.explain_stream`` (the proto's ``StreamOptions``).

    ``latest_frame_wins``: the server explains the newest frame; frames replaced before they
    ran come back skipped. ``frame_deadline_ms``: a frame not started within this many ms of
    its arrival comes back skipped (0: none). ``temporal_smoothing``: EMA weight of the new
    map in (0, 1] (0: off); ``scene_change_correlation`` restarts a class's average when its
    new map correlates less than this with it (0: the server's 0.5; -1: never).
    """

    latest_frame_wins: bool = False
    frame_deadline_ms: int = 0
    temporal_smoothing: float = 0.0
    scene_change_correlation: float = 0.0

    def __post_init__(self) -> None:
        if self.frame_deadline_ms < 0:
            raise CallerError(f"frame_deadline_ms must be >= 0, got {self.frame_deadline_ms}")
        if not 0 <= self.temporal_smoothing <= 1:
            raise CallerError("temporal_smoothing must be in (0, 1] (0: off), got "
                              f"{self.temporal_smoothing}")
        if not -1 <= self.scene_change_correlation <= 1:
            raise CallerError("scene_change_correlation must be in [-1, 1], got "
                              f"{self.scene_change_correlation}")

    def to_proto(self, reset: bool = False) -> pb.StreamOptions:
        return pb.StreamOptions(latest_frame_wins=self.latest_frame_wins,
                                frame_deadline_ms=self.frame_deadline_ms,
                                temporal_smoothing=self.temporal_smoothing,
                                scene_change_correlation=self.scene_change_correlation,
                                reset=reset)


def _choose(option: str, value: str, allowed: Mapping[str, Any]) -> None:
    if value not in allowed:
        raise CallerError(f"unknown {option} {value!r}; choose one of: {', '.join(allowed)}")


def _image_parts(request: pb.ExplainRequest, image: Any, tensor: np.ndarray | None,
                 pixel_format: str | None = None) -> tuple[str | None, bytes | memoryview]:
    """The request's ``image`` oneof: a tensor goes into ``request`` (-> None, b""); encoded
    file bytes -> ("encoded", the bytes); a raw frame (a ``Frame``, a ROS 2 image, or an
    array in ``pixel_format``, sent without conversion) -> its header into
    ``request.pixels``, and ("pixels", its bytes: an array's own memory, not a copy)."""
    if tensor is not None:
        request.tensor.CopyFrom(tensors.to_proto(np.asarray(tensor, np.float32)))
        return None, b""
    if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
        if pixel_format is not None:
            raise CallerError("pixel_format is for image arrays; raw frame bytes need a "
                              "Frame(data, height, width, pixel_format)")
        return "encoded", (Path(image).read_bytes() if isinstance(image, (str, os.PathLike))
                           else image if isinstance(image, bytes) else bytes(image))
    if isinstance(image, (Frame, Mapping)) or hasattr(image, "encoding"):
        frame = image if isinstance(image, Frame) else Frame.from_ros(image)
        if pixel_format not in (None, frame.pixel_format):
            raise CallerError(f"pixel_format {pixel_format!r} contradicts the frame's own "
                              f"{frame.pixel_format!r}")
        frame.to_proto(into=request.pixels, with_pixels=False)
        return "pixels", frame.data
    packed, height, width, name = packed_array(image, pixel_format or "rgb8")
    write_header(request.pixels, height, width, layout_of(name).value)
    return "pixels", memoryview(packed.reshape(-1))


def client_resized(image: Any, spec: Preprocessing, pixel_format: str | None = None,
                   window: Window | None = None) -> tuple[Frame, tuple[int, int]] | None:
    """``image`` (as ``to_request`` takes it) resized for a model that preprocesses with
    ``spec``: an RGB8 ``Frame`` whose shorter side is ``spec.resize`` (``Geometry.for_image``'s
    resized size, resampled with the server's antialiased filter:
    ``camserve.explain.image.resample``), and the caller's (height, width). None when it
    would not shrink (never upscales: send the image as it is).

    Encoded files are decoded here first (a large JPEG at a reduced size, as the server
    would: ``decode_for``, through ``window`` as the server would apply it), other frames
    converted to RGB (``Frame.to_rgb``). The server
    resamples the sent frame at scale 1 (the identity), so the model input is one-step
    preprocessing's within uint8 rounding, and a response's geometry becomes the caller's
    by putting the caller's size in ``Geometry.original``.
    """
    if spec.resize <= 0:  # an older server that does not say
        return None
    photo: np.ndarray | Decoded | None = None
    frame: Frame | None = None
    if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
        if pixel_format is not None:
            return None  # to_request says why not
        data = (Path(image).read_bytes() if isinstance(image, (str, os.PathLike))
                else bytes(image))
        header = declared_size(data)  # min(h, w) does not depend on an EXIF rotation
        if header is None or min(header[1:]) <= spec.resize:
            return None  # the server says what is wrong with it, or it is small already
        photo = decode_for(data, spec.resize, window=window)
        size = photo.original
    elif isinstance(image, (Frame, Mapping)) or hasattr(image, "encoding"):
        frame = image if isinstance(image, Frame) else Frame.from_ros(image)
        if pixel_format not in (None, frame.pixel_format):
            return None  # to_request says why not
        size = (frame.height, frame.width)
    else:
        array = np.asarray(image)
        if (pixel_format in (None, "rgb8") and array.ndim == 3 and array.shape[2] == 3
                and array.dtype == np.uint8):
            photo, size = array, array.shape[:2]  # RGB as it is: no copy
        else:  # checked and converted as the server would
            frame = Frame.from_array(array, pixel_format or "rgb8")
            size = (frame.height, frame.width)
    if min(size) <= spec.resize:
        return None
    target = Geometry.for_image(*size, spec.resize, spec.crop).resized
    if Geometry.for_image(*target, spec.resize, spec.crop).resized != target:
        return None  # resize < crop: the server would resample the sent frame again
    small = resample(frame.to_rgb() if photo is None else photo, *target, spec.interpolation)
    return Frame(small.tobytes(), *target), (int(size[0]), int(size[1]))
