"""Explainer graphs on onnxruntime: load a models folder, validate contract v1, run.

``load_models`` opens every ``*.onnx`` file in a folder, checks it against graph contract v1
(inputs, outputs, metadata) and creates one onnxruntime session per model, on the CUDA
provider when asked and available, else on the CPU.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from camserve import contract
from camserve.contract import ContractError, ModelCard
from camserve.errors import CamserveError

log = logging.getLogger("camserve.server")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


class DeviceError(CamserveError):
    """The requested execution device cannot be used."""


@dataclass
class ExplainerModel:
    """One loaded explainer graph and what its metadata says."""

    name: str
    version: str  # first 12 hex digits of the file's SHA-256
    card: ModelCard
    session: ort.InferenceSession
    provider: str

    @property
    def input_size(self) -> tuple[int, int]:
        return self.card.preprocessing.crop

    @property
    def num_classes(self) -> int:
        return len(self.card.labels)

    def run(self, image: np.ndarray, targets: np.ndarray,
            layers: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, tuple]]:
        """image float32 [B,3,H,W], targets int64 [B,K] -> (logits [B,N], classes [B,K],
        {layer: (activations [B,C,h,w], gradients [B,K,C,h,w])})."""
        chosen = [self.card.layer(name) for name in layers]
        names = [contract.LOGITS, contract.CLASSES]
        for layer in chosen:
            names += [layer.activations, layer.gradients]
        outputs = self.session.run(names, {contract.IMAGE: image, contract.TARGETS: targets})
        per_layer = {layer.name: (outputs[2 + 2 * i], outputs[3 + 2 * i])
                     for i, layer in enumerate(chosen)}
        return outputs[0], outputs[1], per_layer

    def warm_up(self) -> None:
        height, width = self.input_size
        self.run(np.zeros((1, 3, height, width), np.float32), np.full((1, 1), -1, np.int64),
                 [layer.name for layer in self.card.layers])


def read_card(model: onnx.ModelProto, source: str) -> ModelCard:
    """The model's card, after checking its inputs and outputs against contract v1."""
    props = {p.key: p.value for p in model.metadata_props}
    card = ModelCard.from_metadata(props)
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
    declared = [d.dim_value for d in dims[2:]]
    if len(dims) != 4 or tuple(declared) != tuple(card.preprocessing.crop):
        raise ContractError(f"{source}: input 'image' is not [B,3,{card.preprocessing.crop[0]},"
                            f"{card.preprocessing.crop[1]}]")
    return card


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def open_session(path: Path, device: str, threads: int | None) -> tuple[ort.InferenceSession, str]:
    """A session on CUDA (``cuda``; ``auto`` when it works) or the CPU, and its provider.

    onnxruntime-gpu falls back to the CPU without saying so and prints a long native error
    when CUDA libraries are missing; we keep that out of the log and read the provider the
    session really got.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    providers = [CPU]
    if device in ("auto", "cuda") and CUDA in ort.get_available_providers():
        providers = [CUDA, CPU]
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    finally:
        ort.set_default_logger_severity(3)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        raise DeviceError("--device cuda: onnxruntime found no working CUDA GPU (needs "
                          "onnxruntime-gpu with CUDA 13 and cuDNN 9); use --device cpu or auto")
    return session, provider


def load_model(path: Path, device: str = "auto", threads: int | None = None) -> ExplainerModel:
    """Validate and open one explainer file; raises ContractError for a file that isn't one."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises various kinds
        raise ContractError(f"{path.name}: not an ONNX model ({type(exc).__name__})") from exc
    card = read_card(model, path.name)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ContractError(f"{path.name}: fails onnx.checker: "
                            f"{str(exc).strip().splitlines()[0]}") from exc
    del model
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    session, provider = open_session(path, device, threads)
    return ExplainerModel(path.stem, digest, card, session, provider)


def load_models(folder: Path, device: str = "auto",
                threads: int | None = None) -> dict[str, ExplainerModel]:
    """Every valid explainer in ``folder`` by file stem; invalid files are refused and logged.

    Raises CamserveError when the folder holds no usable model.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CamserveError(f"models folder {str(folder)!r} does not exist; "
                            "run 'camserve export' first")
    models: dict[str, ExplainerModel] = {}
    for path in sorted(folder.glob("*.onnx")):
        try:
            model = load_model(path, device, threads)
        except DeviceError:
            raise
        except CamserveError as exc:
            log.error("refusing %s: %s", path.name, exc)
            continue
        model.warm_up()
        log.info("model %s (%s, %d classes, layers %s) runs on %s", model.name,
                 model.card.architecture, model.num_classes,
                 ",".join(layer.name for layer in model.card.layers), model.provider)
        models[model.name] = model
    if not models:
        raise CamserveError(f"no explainer graph in {str(folder)!r} passed validation; "
                            "export one with 'camserve export --out DIR'")
    return models
