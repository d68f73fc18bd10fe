"""``ModelInfo``: what a server says about one of its models (``Client.list_models`` and
``Client.get_model``), as plain Python values rather than protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camserve.contract import Preprocessing
from camserve.explain.frames import LAYOUTS
from camserve.v1 import explainer_pb2 as pb


@dataclass(frozen=True)
class LayerInfo:
    """An explained layer: its module name and activation shape (C, h, w)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """A served model: ``input_shape`` is [1,3,H,W]; ``methods`` are the CAM methods it
    answers (``ExplainOptions.method``); ``layers`` the ones it can explain
    (``ExplainOptions.layers``); ``execution_provider`` where it runs (e.g.
    "CUDAExecutionProvider"); ``version`` the model file's version; ``pixel_formats`` the
    raw frame formats the server decodes ("rgb8", "bgr8", "nv12"...: ``Frame``, or
    ``ExplainOptions.pixel_format``; empty from a server older than them)."""

    name: str
    version: str
    architecture: str
    labels: tuple[str, ...]
    input_shape: tuple[int, ...]
    preprocessing: Preprocessing
    layers: tuple[LayerInfo, ...]
    methods: tuple[str, ...]
    contract_version: int
    execution_provider: str
    camserve_version: str
    pixel_formats: tuple[str, ...] = ()


def model_info(message: pb.ModelInfo) -> ModelInfo:
    """The ModelInfo of a ``camserve.v1.ModelInfo`` message."""
    p = message.preprocessing
    defaults = Preprocessing(resize=0, crop=(0, 0))  # for fields an older server leaves unset
    preprocessing = Preprocessing(
        resize=p.resize, crop=(p.crop_height, p.crop_width),
        mean=_floats(p.mean) or defaults.mean, std=_floats(p.std) or defaults.std,
        scale=_float(p.scale) if p.scale else defaults.scale,
        channel_order=p.channel_order or defaults.channel_order,
        interpolation=p.interpolation or defaults.interpolation,
        grayscale=p.grayscale or defaults.grayscale)
    return ModelInfo(
        name=message.name, version=message.version, architecture=message.architecture,
        labels=tuple(message.labels), input_shape=tuple(message.input_shape),
        preprocessing=preprocessing,
        layers=tuple(LayerInfo(layer.name, tuple(layer.shape)) for layer in message.layers),
        methods=tuple(message.methods), contract_version=message.contract_version,
        execution_provider=message.execution_provider,
        camserve_version=message.camserve_version,
        pixel_formats=tuple(_format_name(value) for value in message.pixel_formats))


def _format_name(value: int) -> str:
    """The SDK's name of a pb.PixelFormat value ("nv12"); one this SDK does not know (a
    newer server's) keeps its number."""
    known = LAYOUTS.get(value)
    return known.name if known is not None else str(value)


def _float(value: float) -> float:
    # The wire's floats are float32: 0.485 arrives as 0.48500001430511475. The shortest
    # decimal that is the same float32 gives back the model card's own value.
    return float(str(np.float32(value)))


def _floats(values) -> tuple[float, ...]:
    return tuple(_float(v) for v in values)
