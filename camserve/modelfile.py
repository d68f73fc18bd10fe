"""Reading an explainer file once: path safety, digest, card, contract and companion checks.

``read`` loads a ``.onnx`` file's protobuf (never its external data) and its version (the
first 12 hex digits of the file's SHA-256) from one read of its bytes, refusing weights
whose external data lies outside the file's folder. ``explainer`` checks a model file
against graph contract v1 (``camserve.contract``) and ``companion`` a saliency or head
companion against the companion contract and its model's card. The server
(``camserve.server.runtime``) and the Triton repository writer (``camserve.export.triton``)
both open files through here. Imports onnx, never onnxruntime.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from camserve import contract
from camserve.contract import ModelCard
from camserve.errors import ContractError
from camserve.onnxgraph import accepts_no_targets, stored_tensors


class CompanionFileError(ContractError):
    """A companion file was opened as a model of its own."""


@dataclass(frozen=True)
class ModelFile:
    """One ``.onnx`` file as read: its protobuf without external data, and its version."""

    path: Path
    proto: onnx.ModelProto
    digest: str  # first 12 hex digits of the file's SHA-256

    @property
    def props(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}

    @property
    def companion_of(self) -> tuple[str, str] | None:
        """(model, kind) when the file is a companion, None for a model."""
        return contract.companion_of(self.props)


@dataclass(frozen=True)
class Explainer:
    """A model file that passed graph contract v1."""

    name: str  # the file's stem
    version: str  # ``ModelFile.digest``
    card: ModelCard
    empty_targets: bool  # runs with K = 0 targets (``onnxgraph.accepts_no_targets``)
    file: ModelFile


def _uid() -> str:
    return str(os.geteuid()) if hasattr(os, "geteuid") else "?"


def read(path: str | Path) -> ModelFile:
    """The file's protobuf and digest from one read; ContractError when it cannot be read,
    is not ONNX, or names external data outside its own folder (``../`` or absolute)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except PermissionError as exc:
        raise ContractError(f"{path.name}: cannot be read (permission denied: the server runs "
                            f"as uid {_uid()}; make the file readable (chmod a+r))"
                            ) from exc
    except OSError as exc:
        raise ContractError(f"{path.name}: cannot be read ({exc.strerror or exc})") from exc
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises various kinds
        raise ContractError(f"{path.name}: not an ONNX file ({type(exc).__name__})") from exc
    folder = path.parent.resolve()
    for tensor in stored_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ContractError(f"{path.name}: weight {tensor.name!r} points at external data "
                                f"{location!r} outside the models folder; refused")
    return ModelFile(path, model, hashlib.sha256(data).hexdigest()[:12])


def explainer(file: ModelFile) -> Explainer:
    """The explainer in ``file`` after the contract and onnx.checker checks;
    CompanionFileError for a companion, ContractError for anything else amiss."""
    owner = file.companion_of
    if owner is not None:
        raise CompanionFileError(f"{file.path.name} is the {owner[1]} companion of model "
                                 f"{owner[0]!r}, not a model of its own")
    card = read_card(file.proto, file.path.name)
    check(file)
    return Explainer(file.path.stem, file.digest, card, accepts_no_targets(file.proto.graph),
                     file)


def companion(file: ModelFile, kind: str, owner: Explainer) -> tuple[str, tuple[str, ...]]:
    """Check a companion of ``kind`` against its contract and its model ``owner``;
    returns the model name it says it belongs to and (head companions) the layers it holds
    a head for."""
    if kind == contract.HEAD:
        card, name, layers = read_head_card(file.proto, file.path.name)
        again = "again"
    else:
        (card, name), layers = read_saliency_card(file.proto, file.path.name), ()
        again = "again with --input-gradients"
    if card != owner.card:
        raise ContractError(f"its metadata (architecture, labels, preprocessing, layers) "
                            f"differs from model {owner.name!r}'s; export both {again}")
    check(file)
    return name, layers


def check(file: ModelFile) -> None:
    """onnx.checker on the protobuf; ContractError with its first line."""
    try:
        onnx.checker.check_model(file.proto)
    except onnx.checker.ValidationError as exc:
        raise ContractError(f"{file.path.name}: fails onnx.checker: "
                            f"{str(exc).strip().splitlines()[0]}") from exc


def read_card(model: onnx.ModelProto, source: str) -> ModelCard:
    """The model's card, after checking its inputs and outputs against contract v1."""
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name for v in model.graph.output}
    for name in (contract.IMAGE, contract.TARGETS):
        if name not in inputs:
            raise ContractError(f"{source}: input {name!r} is missing")
    wanted = [contract.LOGITS, contract.CLASSES]
    wanted += [n for layer in card.layers for n in (layer.activations, layer.gradients)]
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise ContractError(f"{source}: outputs {missing} are missing")
    dims = inputs[contract.IMAGE].type.tensor_type.shape.dim
    declared = [d.dim_value for d in dims[1:]]
    channels = card.preprocessing.channels  # 1 for grayscale "single", else 3
    if len(dims) != 4 or tuple(declared) != (channels, *card.input_size):
        raise ContractError(f"{source}: input 'image' is not [B,{channels},"
                            f"{card.input_size[0]},{card.input_size[1]}]")
    return card


def read_saliency_card(model: onnx.ModelProto, source: str) -> tuple[ModelCard, str]:
    """A saliency companion's card and the name of its model, after checking its inputs
    and outputs against the companion contract."""
    card, owner = _companion_card(model, source, contract.SALIENCY)
    inputs = {v.name: _shape(v) for v in model.graph.input}
    outputs = {v.name: _shape(v) for v in model.graph.output}
    for name in (contract.IMAGE, contract.TARGETS):
        if name not in inputs:
            raise ContractError(f"{source}: input {name!r} is missing")
    missing = [n for n in (contract.LOGITS, contract.CLASSES, contract.INPUT_GRADIENTS)
               if n not in outputs]
    if missing:
        raise ContractError(f"{source}: outputs {missing} are missing")
    height, width = card.input_size
    c = card.preprocessing.channels
    image, grads = inputs[contract.IMAGE], outputs[contract.INPUT_GRADIENTS]
    if len(image) != 4 or image[1:] != [c, height, width]:
        raise ContractError(f"{source}: input 'image' is not [B,{c},{height},{width}]")
    if len(grads) != 5 or grads[2:] != [c, height, width]:
        raise ContractError(f"{source}: output {contract.INPUT_GRADIENTS!r} is not "
                            f"[B,K,{c},{height},{width}]")
    return card, owner


def read_head_card(model: onnx.ModelProto, source: str) -> tuple[ModelCard, str, tuple[str, ...]]:
    """A head companion's card, the name of its model and the layers it holds a head for,
    after checking its inputs and outputs against the companion contract."""
    card, owner = _companion_card(model, source, contract.HEAD)
    inputs = {v.name: _shape(v) for v in model.graph.input}
    outputs = {v.name: _shape(v) for v in model.graph.output}
    logits = contract.head_output_names([layer.name for layer in card.layers])
    layers = []
    for layer, output in zip(card.layers, logits):
        if layer.activations not in inputs:
            continue
        if inputs.pop(layer.activations)[1:] != list(layer.shape):
            raise ContractError(f"{source}: input {layer.activations!r} is not "
                                f"[B,{','.join(map(str, layer.shape))}]")
        if outputs.get(output, [])[1:] != [card.num_classes]:
            raise ContractError(f"{source}: output {output!r} [B,{card.num_classes}] is missing")
        layers.append(layer.name)
    if inputs:
        raise ContractError(f"{source}: inputs {sorted(inputs)} are no layer's activations")
    if not layers:
        raise ContractError(f"{source}: holds no layer's head")
    return card, owner, tuple(layers)


def _companion_card(model: onnx.ModelProto, source: str, kind: str) -> tuple[ModelCard, str]:
    """The card of a companion of ``kind`` and the name of its model; ContractError for a file
    that is not such a companion."""
    props = {p.key: p.value for p in model.metadata_props}
    owner = contract.companion_of(props)
    if owner is None or owner[1] != kind:
        raise ContractError(f"{source}: not a {kind} companion (no {contract.KEY_COMPANION} "
                            f"metadata of kind {kind!r})")
    return ModelCard.from_metadata(props), owner[0]


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]
