"""``Client``: the thin Python SDK (numpy, OpenCV, grpcio, protobuf; no torch, no onnxruntime)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import grpc
import numpy as np

from camserve import tensors
from camserve.client.explanation import Explanation
from camserve.geometry import Geometry, resize_map
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

_SPACES = {"model_input": pb.MODEL_INPUT, "feature_map": pb.FEATURE_MAP}
_FUSIONS = {"mean": pb.MEAN, "sum": pb.SUM, "max": pb.MAX}
_BASELINES = {"black": pb.IntegratedGradients.BLACK, "zero": pb.IntegratedGradients.ZERO}


class ExplainError(RuntimeError):
    """A frame of ``explain_stream`` that the server refused (code and message)."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.request_id = request_id


def load_image(path: str | os.PathLike) -> np.ndarray:
    """A photo file -> RGB uint8 [H,W,3]."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read an image from {str(path)!r}")
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

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # --- calls ----------------------------------------------------------------------------
    def explain(self, image=None, *, tensor: np.ndarray | None = None, model: str = "",
                targets: Sequence[int] | None = None, top_k: int | None = None,
                method: str = "gradcam", layers: Sequence[str] = (), fusion: str = "mean",
                noise_samples: int = 0, noise_sigma: float = 0.15, flip: bool = False,
                seed: int = 0, normalize: bool = True, ig_steps: int = 0,
                ig_baseline: str = "black", request_id: str = "",
                space: str = "model_input") -> list[Explanation]:
        """Explain one image; one Explanation per target (explicit ``targets`` first, then the
        ``top_k`` best classes; with neither, the predicted class).

        ``image``: a file path, encoded bytes (JPEG/PNG/WebP/BMP) or an RGB uint8 [H,W,3]
        array. ``tensor``: instead, a preprocessed float32 [1,3,H,W] array. ``layers`` and
        ``fusion`` ("mean", "sum", "max") pick and combine the model's layers.
        ``noise_samples``/``noise_sigma`` average the map over noisy copies, ``flip`` also
        over mirrored ones (one batched graph run, ``seed`` fixes the noise).
        ``normalize=False`` returns the ReLU'd maps unscaled. ``space="feature_map"`` has
        the server send the maps at the layer's resolution (a few hundred bytes in float16),
        upsampled to the crop here. Input-space methods
        ("saliency", "smoothgrad", "integrated_gradients" with ``ig_steps`` and
        ``ig_baseline`` "black" or "zero", "guided_gradcam") need a model exported with
        ``--input-gradients``.
        """
        request = self.request(image, tensor=tensor, model=model, targets=targets, top_k=top_k,
                               method=method, layers=layers, fusion=fusion,
                               noise_samples=noise_samples, noise_sigma=noise_sigma, flip=flip,
                               seed=seed, normalize=normalize, ig_steps=ig_steps,
                               ig_baseline=ig_baseline, request_id=request_id, space=space)
        response = self._stub.Explain(request, timeout=self.timeout, metadata=self.metadata)
        return explanations(response)

    def explain_stream(self, frames: Iterable, **options) -> Iterator[list[Explanation]]:
        """Explain a sequence of frames over one stream; yields per frame, in order.

        Each frame is an image (as for ``explain``) or a ready ``ExplainRequest``; ``options``
        are ``explain``'s keywords. A refused frame raises ExplainError when reached.
        """
        def requests():
            for index, frame in enumerate(frames):
                if isinstance(frame, pb.ExplainRequest):
                    yield frame
                else:
                    yield self.request(frame, request_id=options.get("request_id") or str(index),
                                       **{k: v for k, v in options.items() if k != "request_id"})

        for response in self._stub.ExplainStream(requests(), timeout=self.timeout,
                                                 metadata=self.metadata):
            if response.HasField("error"):
                raise ExplainError(grpc.StatusCode[_code_name(response.error.code)],
                                   response.error.message, response.request_id)
            yield explanations(response)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                          metadata=self.metadata).models)

    def get_model(self, name: str = "") -> pb.ModelInfo:
        return self._stub.GetModel(pb.GetModelRequest(name=name), timeout=self.timeout,
                                   metadata=self.metadata)

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
    def request(image=None, *, tensor: np.ndarray | None = None, model: str = "",
                targets: Sequence[int] | None = None, top_k: int | None = None,
                method: str = "gradcam", layers: Sequence[str] = (), fusion: str = "mean",
                noise_samples: int = 0, noise_sigma: float = 0.15, flip: bool = False,
                seed: int = 0, normalize: bool = True, ig_steps: int = 0,
                ig_baseline: str = "black", request_id: str = "",
                space: str = "model_input") -> pb.ExplainRequest:
        """The ExplainRequest ``explain`` sends."""
        if (image is None) == (tensor is None):
            raise ValueError("give exactly one of image= or tensor=")
        if fusion not in _FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(_FUSIONS)}")
        if ig_baseline not in _BASELINES:
            raise ValueError(f"unknown baseline {ig_baseline!r}; choose black or zero")
        request = pb.ExplainRequest(
            model=model, request_id=request_id, classes=list(targets or []),
            top_k=top_k if top_k is not None else (0 if targets else 1), method=method,
            layers=list(layers), fusion=_FUSIONS[fusion],
            output=pb.OutputOptions(space=_SPACES[space],
                                    dtype=pb.FLOAT16 if normalize else pb.FLOAT32),
            smoothing=pb.Smoothing(noise_samples=noise_samples, noise_sigma=noise_sigma,
                                   horizontal_flip=flip, seed=seed),
            raw_maps=not normalize,
            integrated_gradients=pb.IntegratedGradients(
                steps=ig_steps, baseline=_BASELINES[ig_baseline]))
        if tensor is not None:
            request.tensor.CopyFrom(tensors.to_proto(np.asarray(tensor, np.float32)))
        elif isinstance(image, (bytes, bytearray, memoryview)):
            request.encoded = bytes(image)
        elif isinstance(image, (str, os.PathLike)):
            request.encoded = Path(image).read_bytes()
        else:
            array = np.ascontiguousarray(image)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise ValueError("an image array must be RGB uint8 [H,W,3], got "
                                 f"{array.dtype} {list(array.shape)}")
            request.pixels.CopyFrom(pb.RawImage(height=array.shape[0], width=array.shape[1],
                                                pixels=array.tobytes()))
        return request


def explanations(response: pb.ExplainResponse) -> list[Explanation]:
    """The Explanations of an ExplainResponse whose maps are at model-input size (or on the
    feature grid, which is upsampled to the crop size here)."""
    g = response.geometry
    geometry = Geometry((g.original_height, g.original_width),
                        (g.resized_height, g.resized_width),
                        (g.crop.x0, g.crop.y0, g.crop.x1, g.crop.y1))
    height, width = g.crop.y1 - g.crop.y0, g.crop.x1 - g.crop.x0
    out = []
    for target in response.targets:
        cam = tensors.from_proto(target.cam).astype(np.float32)
        if target.cam.dtype == pb.UINT8:
            cam = cam / np.float32(255)
        out.append(Explanation(
            class_index=target.class_index, label=target.label, logit=target.logit,
            probability=target.probability, cam_input=resize_map(cam, height, width),
            geometry=geometry, request_id=response.request_id, model=response.model,
            method=response.method))
    return out


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
