"""Graph contract v1: what an explainer ONNX file promises to the server and to edge users.

Inputs:
  ``image``   float32 [B,C,H,W], already preprocessed (see ``Preprocessing``); C = 3, or
              C = 1 for a one-channel model (``Preprocessing.grayscale == "single"``)
  ``targets`` int64 [B,K]; t >= 0 is a class index, t = -r is "the r-th highest logit";
              K = 0 runs the logits only (the gradients come out empty)
Outputs:
  ``logits``      float32 [B,N]
  ``classes``     int64 [B,K], the targets resolved to class indices
  per target layer, an activations/gradients pair (names in the ``camserve.layers`` metadata;
  with one layer they are ``activations`` [B,C,h,w] and ``gradients`` [B,K,C,h,w],
  gradients[b,k] = d logits[b, classes[b,k]] / d activations[b]).

One-channel models (camserve 0.1.0 on, still contract v1): a file whose preprocessing
says ``grayscale: "single"`` (``camserve export --grayscale single``) takes ``image``
[B,1,H,W], and its ``mean`` and ``std`` hold one value each; the server turns every photo
(colour or not) into one luma channel, 0.299 R + 0.587 G + 0.114 B as PIL's ``convert("L")``,
before scaling and normalising, and its saliency companion's ``input_gradients`` are
[B,K,1,H,W]. Files written before (``grayscale: "replicate"``, C = 3) read and run exactly as
they did; an older camserve refuses a one-channel file at its input-shape check.

Everything else the server needs travels in the model's metadata_props, one JSON value per
key (``METADATA_KEYS``). This module is pure Python: the exporter writes it, the server and
the client read it.

Saliency companion (optional, ``camserve export --input-gradients``): a second file
``<stem>.saliency.onnx`` next to ``<stem>.onnx`` (``companion_path``) with the gradient of
the class logits with respect to the input image, for input-space attributions:

Inputs:
  ``image``, ``targets``  as above
Outputs:
  ``logits``           float32 [B,N]
  ``classes``          int64 [B,K], resolved as above
  ``input_gradients``  float32 [B,K,3,H,W], d logits[b, classes[b,k]] / d image[b]

Its metadata holds the main file's card keys (``METADATA_KEYS``, so the file describes
itself) plus ``camserve.companion_of`` = {"model": "<stem>", "kind": "saliency"}
(``KEY_COMPANION``). A companion is not a model on its own: the server attaches it to the
model ``<stem>``.

Head companion (always written by ``camserve export``): ``<stem>.head.onnx``
(``companion_path(path, HEAD)``), the *head* of each explained layer -- the part of the
network from the layer's activations to the logits -- as a graph of its own, so that the
logits can be computed from modified activations (Ablation-CAM; an ONNX runtime cannot feed
an intermediate tensor of the explainer graph). Per layer whose head reads nothing but that
layer's activations:

Inputs:
  ``activations`` / ``activations.<layer>``  float32 [B,C,h,w], named as the explainer's
                                             output for that layer (``Layer.activations``)
Outputs:
  ``logits`` / ``logits.<layer>``            float32 [B,N] (``head_output_names``: plain
                                             when the model explains one layer)

A layer whose head also reads other tensors of the network (a skip connection crossing the
cut, e.g. resnet's ``layer4.0.conv1``, whose block adds ``layer3``'s output back) is left out
of the file; with no such layer at all, no head file is written. Each input has its own
batch dimension. ONNX Runtime wants every graph input fed, so a caller asking for one layer
feeds the others an empty [0,C,h,w] tensor and fetches only that layer's logits (ONNX
Runtime's inference builds run every node whatever the fetches; on a batch of 0 the other
heads cost next to nothing).
The file shares no tensor with the explainer file: it holds its own copy of the head's
weights -- for resnet ``layer4`` that is the fc layer (2 MB for resnet18, 8 MB for
resnet50), for VGG-16's last block the whole classifier (124 M parameters, about 0.5 GB).
Its metadata is that of the saliency companion with kind ``"head"``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from camserve.errors import ContractError

CONTRACT_VERSION = 1

IMAGE = "image"
TARGETS = "targets"
LOGITS = "logits"
CLASSES = "classes"
ACTIVATIONS = "activations"
GRADIENTS = "gradients"
INPUT_GRADIENTS = "input_gradients"

KEY_CONTRACT = "camserve.contract_version"
KEY_VERSION = "camserve.version"
KEY_ARCH = "camserve.architecture"
KEY_LABELS = "camserve.labels"
KEY_PREPROCESSING = "camserve.preprocessing"
KEY_LAYERS = "camserve.layers"
METADATA_KEYS = (KEY_CONTRACT, KEY_VERSION, KEY_ARCH, KEY_LABELS, KEY_PREPROCESSING, KEY_LAYERS)
KEY_COMPANION = "camserve.companion_of"
SALIENCY = "saliency"  # the kind of companion holding ``input_gradients``
HEAD = "head"  # the kind of companion holding the heads (activations -> logits)
COMPANION_KINDS = (SALIENCY, HEAD)
# In a Triton model repository (``camserve export --triton-repo``) the card travels as the
# config.pbtxt ``parameters`` (one per metadata key), plus the file's SHA-256 (first 12 hex
# digits) under this key: the model version a client reports, as ``camserve serve`` does.
KEY_SHA256 = "camserve.sha256"
# The precision the graph computes in (``camserve export --precision``): its weights and
# arithmetic, never its inputs and outputs, which stay as the contract says. Optional: a file
# without it computes in float32.
KEY_PRECISION = "camserve.precision"
FLOAT32 = "float32"
FLOAT16 = "float16"
PRECISIONS = (FLOAT32, FLOAT16)

INTERPOLATIONS = ("bilinear", "bicubic")  # ``Preprocessing.interpolation``
REPLICATE = "replicate"  # a grayscale photo becomes three equal channels; C = 3
SINGLE = "single"  # every photo becomes one luma channel; the model takes C = 1
GRAYSCALE_MODES = (REPLICATE, SINGLE)  # ``Preprocessing.grayscale``


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the ``image`` input.

    RGB uint8 photo -> resize (shorter side to ``resize``, ``interpolation`` bilinear or
    bicubic, antialiased as PIL) -> center crop to ``crop`` = (height, width) -> x * ``scale``
    -> (x - mean) / std per channel -> [1,3,H,W]. Grayscale photos are replicated to three
    channels (``grayscale="replicate"``); with ``grayscale="single"`` every photo becomes one
    luma channel (0.299 R + 0.587 G + 0.114 B) before the scaling, ``mean`` and ``std`` hold
    one value each and the input is [1,1,H,W] (``channels``). ``camserve export`` sets every field from its
    flags (``--resize``, ``--crop``, ``--mean``, ``--std``, ``--scale``, ``--interpolation``,
    ``--grayscale``) and checks them with ``check``.
    """

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    interpolation: str = "bilinear"
    grayscale: str = "replicate"

    def check(self) -> Preprocessing:
        """``self``, or a ContractError naming the first field that no server can apply."""
        def finite(values) -> bool:
            return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)

        if not isinstance(self.resize, int) or self.resize < 1:
            raise ContractError(f"resize must be a positive integer, not {self.resize!r}")
        if (len(self.crop) != 2 or not all(isinstance(v, int) and v >= 1 for v in self.crop)):
            raise ContractError(f"crop must be two positive integers (height, width), not "
                                f"{self.crop!r}")
        if min(self.crop) > self.resize:
            raise ContractError(f"crop {self.crop[0]}x{self.crop[1]} is larger than the resize "
                                f"{self.resize} (the shorter side before cropping)")
        if self.grayscale not in GRAYSCALE_MODES:
            raise ContractError(f"grayscale {self.grayscale!r} is not supported; choose one "
                                f"of: {', '.join(GRAYSCALE_MODES)}")
        n = self.channels
        what = "three finite numbers (R,G,B)" if n == 3 else "one finite number (grayscale)"
        if len(self.mean) != n or not finite(self.mean):
            raise ContractError(f"mean must be {what}, not {self.mean!r}")
        if len(self.std) != n or not finite(self.std) or min(self.std) <= 0:
            raise ContractError(f"std must be {what.replace('finite', 'positive')}, not "
                                f"{self.std!r}")
        if not finite([self.scale]) or self.scale <= 0:
            raise ContractError(f"scale must be a positive number, not {self.scale!r}")
        if self.channel_order != "RGB":
            raise ContractError(f"channel_order {self.channel_order!r} is not supported "
                                "(this camserve feeds RGB)")
        if self.interpolation not in INTERPOLATIONS:
            raise ContractError(f"interpolation {self.interpolation!r} is not supported; "
                                f"choose one of: {', '.join(INTERPOLATIONS)}")
        return self

    @property
    def channels(self) -> int:
        """C of the ``image`` input: 1 with ``grayscale="single"``, else 3."""
        return 1 if self.grayscale == SINGLE else 3

    @classmethod
    def imagenet(cls, size: int) -> "Preprocessing":
        """torchvision's ImageNet evaluation transform at input ``size`` (resize 256/224)."""
        return cls(resize=int(round(size * 256 / 224)), crop=(size, size))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["crop"] = list(self.crop)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "Preprocessing":
        try:
            return cls(
                resize=int(value["resize"]),
                crop=(int(value["crop"][0]), int(value["crop"][1])),
                mean=tuple(float(v) for v in value["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in value["std"]),  # type: ignore[arg-type]
                scale=float(value.get("scale", 1.0 / 255.0)),
                channel_order=str(value.get("channel_order", "RGB")),
                interpolation=str(value.get("interpolation", "bilinear")),
                grayscale=str(value.get("grayscale", "replicate")),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ContractError(f"preprocessing metadata is malformed: {exc!r}") from exc


@dataclass(frozen=True)
class Layer:
    """One explained layer: its module name and the graph outputs that carry it.

    ``shape`` is (C, h, w) of the activations.
    """

    name: str
    activations: str
    gradients: str
    shape: tuple[int, int, int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "activations": self.activations,
                "gradients": self.gradients, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "Layer":
        try:
            return cls(str(value["name"]), str(value["activations"]), str(value["gradients"]),
                       tuple(int(v) for v in value["shape"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"layer metadata is malformed: {exc!r}") from exc


def layer_output_names(layer_names: list[str]) -> list[tuple[str, str]]:
    """(activations, gradients) output names per layer: plain names for a single layer."""
    if len(layer_names) == 1:
        return [(ACTIVATIONS, GRADIENTS)]
    return [(f"{ACTIVATIONS}.{n}", f"{GRADIENTS}.{n}") for n in layer_names]


def head_output_names(layer_names: list[str]) -> list[str]:
    """The head companion's logits output per layer: ``logits`` for a single layer."""
    if len(layer_names) == 1:
        return [LOGITS]
    return [f"{LOGITS}.{n}" for n in layer_names]


def companion_path(model_path: str | Path, kind: str = SALIENCY) -> Path:
    """``<stem>.<kind>.onnx`` next to the model file ``<stem>.onnx``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.{kind}.onnx")


def companion_metadata(model: str, kind: str = SALIENCY) -> dict[str, str]:
    """The metadata entry marking a file as the ``kind`` companion of model ``model``."""
    return {KEY_COMPANION: json.dumps({"model": model, "kind": kind})}


def companion_of(props: Mapping[str, str]) -> tuple[str, str] | None:
    """(model, kind) when the metadata ``props`` mark a companion file, else None."""
    if KEY_COMPANION not in props:
        return None
    try:
        value = json.loads(props[KEY_COMPANION])
        model, kind = str(value["model"]), str(value["kind"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ContractError(f"{KEY_COMPANION} metadata is malformed: {exc!r}") from exc
    if kind not in COMPANION_KINDS:
        raise ContractError(f"unknown companion kind {kind!r}; this camserve reads: "
                            f"{', '.join(COMPANION_KINDS)}")
    return model, kind


@dataclass(frozen=True)
class ModelCard:
    """Everything the metadata of an explainer graph says about it."""

    architecture: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    layers: tuple[Layer, ...]
    camserve_version: str = ""
    contract_version: int = CONTRACT_VERSION
    precision: str = FLOAT32  # what the graph computes in (``KEY_PRECISION``)
    extra: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        """metadata_props entries, each value JSON."""
        return {
            KEY_CONTRACT: json.dumps(self.contract_version),
            KEY_VERSION: json.dumps(self.camserve_version),
            KEY_ARCH: json.dumps(self.architecture),
            KEY_LABELS: json.dumps(list(self.labels)),
            KEY_PREPROCESSING: json.dumps(self.preprocessing.to_json()),
            KEY_LAYERS: json.dumps([layer.to_json() for layer in self.layers]),
            KEY_PRECISION: json.dumps(self.precision),
        }

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> "ModelCard":
        missing = [k for k in METADATA_KEYS if k not in props]
        if missing:
            raise ContractError(f"metadata lacks {', '.join(missing)}; "
                                "is this a file written by 'camserve export'?")
        try:
            values = {k: json.loads(props[k]) for k in METADATA_KEYS}
        except json.JSONDecodeError as exc:
            raise ContractError(f"metadata value is not JSON: {exc}") from exc
        version = values[KEY_CONTRACT]
        if version != CONTRACT_VERSION:
            raise ContractError(f"graph contract version {version!r} is not supported "
                                f"(this camserve reads version {CONTRACT_VERSION})")
        labels = values[KEY_LABELS]
        layers = values[KEY_LAYERS]
        if not isinstance(labels, list) or not isinstance(layers, list) or not layers:
            raise ContractError("metadata labels and layers must be non-empty JSON lists")
        try:
            precision = json.loads(props.get(KEY_PRECISION, json.dumps(FLOAT32)))
        except json.JSONDecodeError as exc:
            raise ContractError(f"metadata value is not JSON: {exc}") from exc
        if precision not in PRECISIONS:
            raise ContractError(f"precision {precision!r} is not supported (this camserve "
                                f"reads {', '.join(PRECISIONS)})")
        return cls(
            architecture=str(values[KEY_ARCH]),
            labels=tuple(str(label) for label in labels),
            preprocessing=Preprocessing.from_json(values[KEY_PREPROCESSING]),
            layers=tuple(Layer.from_json(layer) for layer in layers),
            camserve_version=str(values[KEY_VERSION]),
            contract_version=int(version),
            precision=precision,
        )

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the ``image`` input: the preprocessing's crop."""
        return self.preprocessing.crop

    @property
    def num_classes(self) -> int:
        """N, the width of ``logits``."""
        return len(self.labels)

    def fetches(self, layers: list[str]) -> list[str]:
        """The explainer outputs to fetch for ``layers``: logits, classes, then per layer its
        activations and gradients (``unpack`` reads them back). Raises KeyError for a layer
        the card does not list."""
        names = [LOGITS, CLASSES]
        for layer in (self.layer(name) for name in layers):
            names += [layer.activations, layer.gradients]
        return names

    def unpack(self, layers: list[str], values: list[Any]) -> tuple[Any, Any, dict[str, tuple]]:
        """``fetches(layers)``'s values -> (logits, classes, {layer: (activations,
        gradients)})."""
        per_layer = {name: (values[2 + 2 * i], values[3 + 2 * i])
                     for i, name in enumerate(layers)}
        return values[0], values[1], per_layer

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in self.layers)
        raise KeyError(f"unknown layer {name!r}; this model explains: {known}")
