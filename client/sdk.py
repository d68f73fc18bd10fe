"""``Client``: the thin Python SDK (numpy, OpenCV, grpcio, protobuf; no torch, no onnxruntime)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import cv2
import grpc
import numpy as np

from camserve import tensors
from camserve.client.explanation import Explanation, from_targets
from camserve.client.models import ModelInfo, model_info
from camserve.client.options import ExplainOptions
from camserve.errors import CallerError, RemoteError
from camserve.explain.geometry import Geometry
from camserve.explain.pipeline import Target
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Self


class ExplainError(RemoteError):
    """A frame of ``explain_stream`` that the server refused: ``code`` is the gRPC status name
    (e.g. "INVALID_ARGUMENT"), ``request_id`` the frame's."""

    def __init__(self, message: str, code: str = "UNKNOWN", request_id: str = "") -> None:
        super().__init__(f"{code}: {message}", code, request_id)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """A photo file -> RGB uint8 [H,W,3]."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise CallerError(f"cannot read an image from {str(path)!r}: the file is missing or "
                          "is not an image OpenCV can decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


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
        self.timeout = timeout
        self.metadata = list(metadata or [])
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

        ``image``: a file path, encoded bytes (JPEG/PNG/WebP/BMP) or an RGB uint8 [H,W,3]
        array; ``tensor``: instead, a preprocessed float32 [1,3,H,W] array. ``options`` and
        the keyword ``overrides`` (applied on top) are ``ExplainOptions``' fields: model,
        targets, top_k, method, layers, fusion, noise_samples, ... Input-space methods
        ("saliency", "smoothgrad", "integrated_gradients", "guided_gradcam") need a model
        exported with ``--input-gradients``. A refused call raises ``grpc.RpcError``.
        """
        request = self.request(image, tensor=tensor, options=options, **overrides)
        response = self._stub.Explain(request, timeout=self.timeout, metadata=self.metadata)
        return explanations(response)

    def explain_stream(self, frames: Iterable, *, options: ExplainOptions | None = None,
                       **overrides) -> Iterator[list[Explanation]]:
        """Explain a sequence of frames over one stream; yields per frame, in order.

        Each frame is an image (as for ``explain``) or a ready ``ExplainRequest``; ``options``
        and ``overrides`` as for ``explain``. A frame without a ``request_id`` gets its index.
        A refused frame raises ExplainError when reached.
        """
        merged = ExplainOptions.merged(options, overrides)  # checked before the stream opens

        def requests():
            for index, frame in enumerate(frames):
                if isinstance(frame, pb.ExplainRequest):
                    yield frame
                else:
                    request = merged.to_request(frame)
                    request.request_id = merged.request_id or str(index)
                    yield request

        for response in self._stub.ExplainStream(requests(), timeout=self.timeout,
                                                 metadata=self.metadata):
            if response.HasField("error"):
                raise ExplainError(response.error.message, _code_name(response.error.code),
                                   response.request_id)
            yield explanations(response)

    def list_models(self) -> list[ModelInfo]:
        """The models the server serves."""
        answer = self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                       metadata=self.metadata)
        return [model_info(m) for m in answer.models]

    def get_model(self, name: str = "") -> ModelInfo:
        """One model ("": the server's default); grpc.RpcError NOT_FOUND if it has none such."""
        return model_info(self._stub.GetModel(pb.GetModelRequest(name=name),
                                              timeout=self.timeout, metadata=self.metadata))

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
        """The ExplainRequest ``explain`` sends (arguments as for ``explain``)."""
        return ExplainOptions.merged(options, overrides).to_request(image, tensor)


def explanations(response: pb.ExplainResponse) -> list[Explanation]:
    """The Explanations of an ExplainResponse whose maps are at model-input size (or on the
    feature grid, which is upsampled to the crop size here)."""
    g = response.geometry
    geometry = Geometry((g.original_height, g.original_width),
                        (g.resized_height, g.resized_width),
                        (g.crop.x0, g.crop.y0, g.crop.x1, g.crop.y1))
    targets = [Target(t.class_index, t.label, t.logit, t.probability, _decode_map(t.cam))
               for t in response.targets]
    return from_targets(targets, geometry, model=response.model, method=response.method,
                        request_id=response.request_id)


def _decode_map(message: pb.Tensor) -> np.ndarray:
    """A map as sent (float32, float16, or uint8 = map * 255) -> float32 [h,w]."""
    cam = tensors.from_proto(message).astype(np.float32)
    return cam / np.float32(255) if message.dtype == pb.UINT8 else cam


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
