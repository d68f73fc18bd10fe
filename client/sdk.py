"""``Client``: the thin Python SDK (numpy, OpenCV, grpcio, protobuf; no torch, no onnxruntime)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from camserve import protowire, tensors
from camserve.client.explanation import Explanation, ServerTimings, from_targets
from camserve.client.models import ModelInfo, model_info
from camserve.client.options import ExplainOptions, Outgoing, StreamOptions, client_resized
from camserve.contract import Preprocessing
from camserve.errors import CallerError, RemoteError
from camserve.explain.geometry import Geometry
from camserve.explain.image import Window, decode
from camserve.explain.pipeline import Target
from camserve.explain.regions import Region, find_regions
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Self


class ExplainError(RemoteError):
    """A frame of ``explain_stream`` that the server refused: ``code`` is the gRPC status name
    (e.g. "INVALID_ARGUMENT"), ``request_id`` the frame's."""

    def __init__(self, message: str, code: str = "UNKNOWN", request_id: str = "") -> None:
        super().__init__(f"{code}: {message}", code, request_id)


def load_image(path: str | os.PathLike,
               window: Window | tuple[float, float] | None = None) -> np.ndarray:
    """A photo file -> RGB uint8 [H,W,3], decoded as the server decodes it (a 16-bit PNG
    windowed over its own min..max, or through ``window``, a ``Window`` or (center, width):
    ``camserve.explain.image``), so that an overlay shows what the model saw."""
    try:
        if isinstance(window, tuple):
            window = Window(*window)
        return decode(Path(path).read_bytes(), window=window)
    except (OSError, CallerError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise CallerError(f"cannot read an image from {str(path)!r}: {why}") from None


# Unary calls that find the server UNAVAILABLE (restarting, shutting down, a replica gone)
# are retried with exponential backoff; no other status is retried. Keepalive pings every
# 30 s (the server accepts pings that often) notice a dead connection.
RETRY_POLICY = {"methodConfig": [{
    "name": [{"service": "camserve.v1.Explainer"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}
CHANNEL_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_POLICY)),
                   ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
                   # reconnect soon enough for the retries to find a restarted server
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
DEFAULT_TIMEOUT = 30.0
CLIENT_TIMEOUT = object()  # explain_stream's default deadline: the client's ``timeout``


class Client:
    """A connection to a camserve server.

    ``target`` is "host:port"; ``credentials`` (grpc.ChannelCredentials) makes the channel
    secure; ``metadata`` (pairs) rides on every call; ``token`` adds the bearer token a server
    started with ``--auth-token-file`` asks for; ``timeout`` is each call's deadline in
    seconds. Use as a context manager, or call ``close``.
    """

    def __init__(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                 credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None,
                 token: str | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes), *CHANNEL_OPTIONS]
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials
                         else grpc.insecure_channel(target, options))
        self._stub = pb_grpc.ExplainerStub(self._channel)
        # Explain and ExplainStream with requests the SDK serializes itself (``Outgoing``:
        # the image appended once, not copied in and out of a protobuf message)
        self._explain_wire = self._channel.unary_unary(
            protowire.method_path("Explain"), response_deserializer=pb.ExplainResponse.FromString)
        self._explain_stream_wire = self._channel.stream_stream(
            protowire.method_path("ExplainStream"),
            response_deserializer=pb.ExplainResponse.FromString)
        self.timeout = timeout
        self.metadata = list(metadata or [])
        self._preprocessing: dict[str, Preprocessing] = {}  # model name -> its, for resizing
        if token:
            self.metadata.append(("authorization", f"Bearer {token}"))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # --- calls ----------------------------------------------------------------------------
    def explain(self, image=None, *, tensor: np.ndarray | None = None,
                options: ExplainOptions | None = None, **overrides) -> list[Explanation]:
        """Explain one image; one Explanation per target (explicit ``targets`` first, then the
        ``top_k`` best classes; with neither, the predicted class).

        ``image``: a file path, encoded bytes (JPEG/PNG/WebP/BMP), an RGB uint8 [H,W,3]
        array (or one in ``pixel_format="bgr8"``, "nv12"...: sent as it is, the server
        converts), a raw camera ``Frame``, or a ROS 2 sensor_msgs/Image (or its dict);
        ``tensor``: instead, a preprocessed float32 [1,3,H,W] array. ``options`` and
        the keyword ``overrides`` (applied on top) are ``ExplainOptions``' fields: model,
        targets, top_k, method, layers, fusion, noise_samples, ... Input-space methods
        ("saliency", "smoothgrad", "integrated_gradients", "guided_gradcam") need a model
        exported with ``--input-gradients``. A refused call raises ``grpc.RpcError``.
        With ``resize_on_client=True`` an image larger than the model needs is resized here
        (``client_resized``; the model's preprocessing is read once per model with
        ``get_model``) and the answer mapped back onto the image as given.
        """
        asked = merged = ExplainOptions.merged(options, overrides)
        resized = None
        if asked.resize_on_client:
            merged = dataclasses.replace(asked, resize_on_client=False)
            if image is not None:
                resized = client_resized(image, self._preprocessing_of(asked.model),
                                         asked.pixel_format,
                                         asked.window and Window(*asked.window))
        if resized is not None:
            image, original = resized
            sent = image.height * image.width / (original[0] * original[1])
            merged = dataclasses.replace(merged, pixel_format=None, window=None,  # applied
                                         min_area=asked.min_area * sent)  # in sent pixels
        request = merged.outgoing(image, tensor).serialized()
        response = self._explain_wire(request, timeout=self.timeout, metadata=self.metadata)
        found = explanations(response)
        return found if resized is None else [_onto(e, original, asked) for e in found]

    def explain_stream(self, frames: Iterable, *, options: ExplainOptions | None = None,
                       stream: StreamOptions | None = None,
                       timeout: float | None | object = CLIENT_TIMEOUT,
                       **overrides) -> StreamCall:
        """Explain a sequence of frames over one stream; iterate the result per frame, in
        order.

        Each frame is an image (as for ``explain``) or a ready ``ExplainRequest`` (e.g. with
        ``stream.reset`` set); ``options`` and ``overrides`` as for ``explain``. A frame
        without a ``request_id`` gets its index. A refused frame raises ExplainError when
        reached. Without ``stream`` every frame is explained and each yields its list of
        Explanations. With ``stream`` (``StreamOptions``: latest frame wins, per-frame
        deadlines, temporal smoothing; sent on the first request) each frame yields a
        ``StreamFrame``, skipped ones included. The call's deadline is ``timeout`` seconds
        (default: the client's; None: none). The returned ``StreamCall`` has ``stats`` (the
        server's StreamStats as a dict, once the stream ended) and ``cancel()``.
        """
        merged = ExplainOptions.merged(options, overrides)  # checked before the stream opens
        first = stream.to_proto() if stream is not None else None

        def requests() -> Iterator[bytes]:
            for index, frame in enumerate(frames):
                if isinstance(frame, pb.ExplainRequest):
                    outgoing = Outgoing(frame, None)
                else:
                    outgoing = merged.outgoing(frame)
                    outgoing.request.request_id = merged.request_id or str(index)
                if index == 0 and first is not None:
                    outgoing = dataclasses.replace(
                        outgoing, request=_with_stream(outgoing.request, first))
                yield outgoing.serialized()

        call = self._explain_stream_wire(
            requests(), timeout=self.timeout if timeout is CLIENT_TIMEOUT else timeout,
            metadata=self.metadata)
        return StreamCall(call, frames=stream is not None)

    def list_models(self) -> list[ModelInfo]:
        """The models the server serves."""
        answer = self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                       metadata=self.metadata)
        return [model_info(m) for m in answer.models]

    def get_model(self, name: str = "") -> ModelInfo:
        """One model ("": the server's default); grpc.RpcError NOT_FOUND if it has none such."""
        return model_info(self._stub.GetModel(pb.GetModelRequest(name=name),
                                              timeout=self.timeout, metadata=self.metadata))

    def _preprocessing_of(self, model: str) -> Preprocessing:
        """The preprocessing of ``model`` ("": the default), asked once per client."""
        if model not in self._preprocessing:
            self._preprocessing[model] = self.get_model(model).preprocessing
        return self._preprocessing[model]

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status of the server ("") or of a model: "SERVING", "NOT_SERVING"...

        The two health messages are tiny, so they are encoded here by hand rather than
        pulling in another package: HealthCheckRequest{1: service}, HealthCheckResponse{1:
        status enum}.
        """
        check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=_encode_health_request, response_deserializer=_decode_health)
        return check(service, timeout=self.timeout, metadata=self.metadata)

    def wait_until_serving(self, timeout: float = 60.0,
                           starting: Callable[[], bool] = lambda: True) -> bool:
        """Poll health until the server reports SERVING (True), ``timeout`` seconds pass, or
        ``starting()`` says the server is gone (False); e.g. after launching a server."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and starting():
            try:
                if self.health() == "SERVING":
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        return False

    # --- building requests ----------------------------------------------------------------
    @staticmethod
    def request(image=None, *, tensor: np.ndarray | None = None,
                options: ExplainOptions | None = None, **overrides) -> pb.ExplainRequest:
        """The ExplainRequest ``explain`` sends (arguments as for ``explain``; without
        ``resize_on_client``, which needs the server's answer about the model)."""
        return ExplainOptions.merged(options, overrides).to_request(image, tensor)



@dataclass(frozen=True)
class StreamFrame:
    """One frame's fate in a stream with ``StreamOptions``: its Explanations, or None when
    the server skipped it (``skip_reason`` says why: replaced by a newer frame, deadline)."""

    request_id: str
    explanations: list[Explanation] | None
    skip_reason: str = ""

    @property
    def skipped(self) -> bool:
        return self.explanations is None


class StreamCall:
    """The responses of ``Client.explain_stream``: an iterator per frame, ``stats`` (a dict of
    the server's StreamStats: frames_received, frames_explained, frames_skipped,
    frames_failed, latency_p50_ms, latency_p99_ms) once the stream ended, ``cancel()``."""

    def __init__(self, call, frames: bool) -> None:
        self._call = call
        self._frames = frames
        self.stats: dict | None = None

    def __iter__(self) -> Self:
        return self

    def __next__(self):
        while True:
            try:
                response = next(self._call)
            except StopIteration:
                if self.stats is None:  # the trailing metadata has them too
                    found = dict(self._call.trailing_metadata() or ()).get(
                        "camserve-stream-stats")
                    self.stats = json.loads(found) if found else None
                raise
            if response.HasField("stream_stats"):
                self.stats = {f.name: getattr(response.stream_stats, f.name)
                              for f in response.stream_stats.DESCRIPTOR.fields}
                if not (response.request_id or response.skipped or response.targets):
                    continue  # the stats-only last response
            if response.HasField("error"):
                raise ExplainError(response.error.message, _code_name(response.error.code),
                                   response.request_id)
            if not self._frames:
                return explanations(response)
            if response.skipped:
                return StreamFrame(response.request_id, None, response.skip_reason)
            return StreamFrame(response.request_id, explanations(response))

    def cancel(self) -> None:
        """End the stream now (the server drops its waiting frames)."""
        self._call.cancel()


def _with_stream(request: pb.ExplainRequest, options: pb.StreamOptions) -> pb.ExplainRequest:
    """A copy of ``request`` carrying the stream's options (keeping its ``reset``)."""
    copy = pb.ExplainRequest()
    copy.CopyFrom(request)
    reset = request.stream.reset
    copy.stream.CopyFrom(options)
    copy.stream.reset = reset
    return copy


def explanations(response: pb.ExplainResponse) -> list[Explanation]:
    """The Explanations of an ExplainResponse whose maps are at model-input size (or on the
    feature grid, which is upsampled to the crop size here; or absent, CamSpace NO_MAP),
    with the server's regions when it sent them."""
    g = response.geometry
    geometry = Geometry((g.original_height, g.original_width),
                        (g.resized_height, g.resized_width),
                        (g.crop.x0, g.crop.y0, g.crop.x1, g.crop.y1))
    targets = [Target(t.class_index, t.label, t.logit, t.probability,
                      _decode_map(t.cam) if t.HasField("cam") else None,
                      tuple(_decode_region(r) for r in t.regions))
               for t in response.targets]
    stages = response.timings
    timings = ServerTimings.from_us(stages.decode_us, stages.preprocess_us,
                                    stages.inference_us, stages.postprocess_us) \
        if response.HasField("timings") else None
    return from_targets(targets, geometry, model=response.model, method=response.method,
                        request_id=response.request_id, timings=timings)


def _onto(found: Explanation, original: tuple[int, int],
          options: ExplainOptions) -> Explanation:
    """An Explanation of a frame resized on the client, on the caller's ``original`` (H0, W0)
    image: the geometry's resized image scales to ``original`` instead of the sent frame
    (``to_original``: exact). Regions asked for are found again on the caller's grid from
    the map, as the server finds them on a full-size image (``find_regions``); without a map
    (space "none") the server's are scaled (vertices at the centres of the blocks their
    pixels became, so a little inside the outline; areas times both scales)."""
    geometry = dataclasses.replace(found.geometry, original=original)
    moved = dataclasses.replace(found, geometry=geometry)
    if not found.server_regions and not options.regions:
        return moved
    if found.cam_input is not None:
        regions = find_regions(moved.cam, options.region_threshold, options.max_regions,
                               options.min_area)
        return dataclasses.replace(moved, server_regions=tuple(regions))
    sy, sx = original[0] / found.geometry.original[0], original[1] / found.geometry.original[1]
    scaled = []
    for region in found.server_regions:
        polygon = np.rint((region.polygon + 0.5) * (sx, sy) - 0.5).astype(np.int32)
        polygon = np.minimum(polygon, (original[1] - 1, original[0] - 1))
        low, high = polygon.min(axis=0), polygon.max(axis=0) + 1
        scaled.append(Region(polygon, (int(low[0]), int(low[1]), int(high[0]), int(high[1])),
                             region.area * sx * sy, region.peak))
    return dataclasses.replace(moved, server_regions=tuple(scaled))


def _decode_map(message: pb.Tensor) -> np.ndarray:
    """A map as sent (float32, float16, or uint8 = map * 255) -> float32 [h,w]."""
    cam = tensors.cast(tensors.from_proto(message), np.float32)
    return cam / np.float32(255) if message.dtype == pb.UINT8 else cam


def _decode_region(message: pb.Region) -> Region:
    polygon = np.array([(p.x, p.y) for p in message.polygon], np.int32).reshape(-1, 2)
    b = message.box
    return Region(polygon, (b.x0, b.y0, b.x1, b.y1), message.area, message.peak)


_HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _encode_health_request(service: str) -> bytes:
    data = service.encode()
    if not data:
        return b""
    return b"\x0a" + _varint(len(data)) + data


def _decode_health(data: bytes) -> str:
    # field 1, varint: tag byte 0x08 then the value (a small enum)
    if len(data) >= 2 and data[0] == 0x08:
        return _HEALTH.get(data[1], str(data[1]))
    return "UNKNOWN"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"
