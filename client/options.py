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

from camserve import tensors
from camserve.errors import CallerError
from camserve.explain.methods import DEFAULT_METHOD, FUSIONS
from camserve.explain.smoothing import NOISE_SIGMA
from camserve.v1 import explainer_pb2 as pb

# The SDK's names for the proto's enums.
_FUSIONS = {name: pb.LayerFusion.Value(name.upper()) for name in FUSIONS}
_BASELINES = {"black": pb.IntegratedGradients.BLACK, "zero": pb.IntegratedGradients.ZERO}
_SPACES = {"model_input": pb.MODEL_INPUT, "feature_map": pb.FEATURE_MAP}


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
    the layer's grid [h,w] instead of the model input [H,W]. ``request_id`` is echoed back.
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

    def __post_init__(self) -> None:
        # Tuples, so that a frozen options object really is immutable (and numpy arrays of
        # class indices work: ``array or []`` would not).
        object.__setattr__(self, "targets",
                           () if self.targets is None else tuple(int(t) for t in self.targets))
        object.__setattr__(self, "layers", tuple(self.layers))
        _choose("fusion", self.fusion, _FUSIONS)
        _choose("ig_baseline", self.ig_baseline, _BASELINES)
        _choose("space", self.space, _SPACES)
        # unsigned on the wire: protobuf would refuse them with a less helpful message
        for name in ("top_k", "noise_samples", "seed", "ig_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise CallerError(f"{name} must be >= 0, got {value}")

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
        """The ExplainRequest for ``image`` (a file path, encoded JPEG/PNG/WebP/BMP bytes, or
        an RGB uint8 [H,W,3] array) or ``tensor`` (preprocessed float32 [1,3,H,W])."""
        if (image is None) == (tensor is None):
            raise CallerError("give exactly one of image= or tensor=")
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
        _set_image(request, image, tensor)
        return request


def _choose(option: str, value: str, allowed: Mapping[str, Any]) -> None:
    if value not in allowed:
        raise CallerError(f"unknown {option} {value!r}; choose one of: {', '.join(allowed)}")


def _set_image(request: pb.ExplainRequest, image: Any, tensor: np.ndarray | None) -> None:
    """Fill the request's ``image`` oneof: tensor, encoded file bytes or raw RGB pixels."""
    if tensor is not None:
        request.tensor.CopyFrom(tensors.to_proto(np.asarray(tensor, np.float32)))
    elif isinstance(image, (bytes, bytearray, memoryview)):
        request.encoded = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        request.encoded = Path(image).read_bytes()
    else:
        array = np.ascontiguousarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise CallerError("an image array must be RGB uint8 [H,W,3], got "
                              f"{array.dtype} {list(array.shape)}")
        request.pixels.CopyFrom(pb.RawImage(height=array.shape[0], width=array.shape[1],
                                            pixels=array.tobytes()))
