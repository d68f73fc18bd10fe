"""Explainer graphs on onnxruntime: load a models folder, validate contract v1, run.

``load_models`` opens every ``*.onnx`` file in a folder, checks it against graph contract v1
(inputs, outputs, metadata) and creates one onnxruntime session per model, on the CUDA
provider when asked and available, else on the CPU.

A saliency companion ``<stem>.saliency.onnx`` (``camserve export --input-gradients``) is not
a model of its own: it is validated and attached to the model ``<stem>`` as
``ExplainerModel.saliency``, whose ``input_gradients`` and ``gradients_of`` run it. The head
companion ``<stem>.head.onnx`` (activations -> logits per layer, written by every export) is
attached the same way as ``ExplainerModel.head``; ``head_logits`` runs it.

On the CUDA provider every run goes through onnxruntime's IO binding (``run_bound``): the
host inputs are bound (copied to the GPU once, at binding), the outputs are allocated by
onnxruntime on the GPU from its memory arena and copied to host NumPy arrays once, after
the run. ``io_binding`` switches it on or off per model (default: on for CUDA only).
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
from camserve.server.pipeline import CardSizes

log = logging.getLogger("camserve.server")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


class DeviceError(CamserveError):
    """The requested execution device cannot be used."""


class MissingCompanionError(CamserveError):
    """A method was asked of a model exported without the companion it needs."""


class CompanionFileError(ContractError):
    """A companion file was opened as a model of its own."""


@dataclass
class ExplainerModel(CardSizes):
    """One loaded explainer graph and what its metadata says."""

    name: str
    version: str  # first 12 hex digits of the file's SHA-256
    card: ModelCard
    session: ort.InferenceSession
    provider: str
    saliency: ort.InferenceSession | None = None  # the <stem>.saliency.onnx companion
    head: ort.InferenceSession | None = None  # the <stem>.head.onnx companion
    head_layers: tuple[str, ...] = ()  # the layers it holds a head for
    io_binding: bool = False  # run through onnxruntime IO binding (``run_bound``)
    empty_targets: bool = False  # the graph runs with K = 0 targets (``accepts_no_targets``)

    def run(self, image: np.ndarray, targets: np.ndarray,
            layers: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, tuple]]:
        """image float32 [B,3,H,W], targets int64 [B,K] -> (logits [B,N], classes [B,K],
        {layer: (activations [B,C,h,w], gradients [B,K,C,h,w])})."""
        outputs = self._run(self.session, self.card.fetches(layers),
                            {contract.IMAGE: image, contract.TARGETS: targets})
        return self.card.unpack(layers, outputs)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """logits [S,N] of a batch float32 [S,3,H,W]. onnxruntime's inference builds run the
        whole graph whatever the fetches, so the targets are empty (K = 0) when the file
        allows it (``empty_targets``): the gradient part then runs on empty tensors. Older
        exports get the top-1 class, and compute its gradients for nothing."""
        # K = 0 targets where the file allows it: the adjoint then runs on empty tensors
        targets = np.zeros((len(batch), 0 if self.empty_targets else 1), np.int64) - 1
        return self._run(self.session, [contract.LOGITS], {contract.IMAGE: batch,
                                                           contract.TARGETS: targets})[0]

    def input_gradients(self, images: np.ndarray, targets: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images float32 [S,3,H,W], targets int64 [S,K] (as for ``run``) -> (logits [S,N],
        classes [S,K], grads [S,K,3,H,W] = d logits[s, classes[s,k]] / d images[s]).

        Raises MissingCompanionError when the model has no saliency companion.
        """
        if self.saliency is None:
            raise MissingCompanionError(
                f"model {self.name!r} was exported without --input-gradients: input-space "
                f"attributions need its companion {self.name}.saliency.onnx (export it again "
                "with 'camserve export ... --input-gradients')")
        logits, classes, grads = self._run(
            self.saliency, [contract.LOGITS, contract.CLASSES, contract.INPUT_GRADIENTS],
            {contract.IMAGE: images, contract.TARGETS: targets})
        return logits, classes, grads

    def gradients_of(self, batch: np.ndarray, classes: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The ``gradients_of`` callable of ``camserve.server.attributions``: batch float32
        [S,3,H,W] and the same class indices [K] (>= 0) for every image -> (logits [S,N],
        grads [S,K,3,H,W]); one run of the companion."""
        classes = np.asarray(classes, np.int64).reshape(-1)
        targets = np.ascontiguousarray(np.broadcast_to(classes, (len(batch), len(classes))))
        logits, _, grads = self.input_gradients(np.ascontiguousarray(batch, np.float32),
                                                targets)
        return logits, grads

    def head_logits(self, layer: str, activations: np.ndarray) -> np.ndarray:
        """logits [S,N] of the network continued from ``layer``'s activations [S,C,h,w]
        (e.g. with channels ablated): one run of the head companion.

        Raises MissingCompanionError when the model has no head for ``layer``.
        """
        if layer not in self.head_layers:
            raise MissingCompanionError(self._no_head(layer))
        assert self.head is not None
        names = contract.head_output_names([item.name for item in self.card.layers])
        chosen = self.card.layer(layer)
        feeds = {}
        for item in self.card.layers:  # every input must be fed: the others get batch 0
            if item.name in self.head_layers and item is not chosen:
                feeds[item.activations] = np.zeros((0, *item.shape), np.float32)
        feeds[chosen.activations] = np.ascontiguousarray(activations, np.float32)
        output = names[self.card.layers.index(chosen)]
        return self._run(self.head, [output], feeds)[0]

    def _run(self, session: ort.InferenceSession, names: list[str],
             feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``session.run(names, feeds)``, through IO binding when ``io_binding``."""
        if self.io_binding:
            return run_bound(session, names, feeds)
        return session.run(names, feeds)

    def _no_head(self, layer: str) -> str:
        self.card.layer(layer)  # KeyError for an unknown layer
        if self.head is None:
            return (f"model {self.name!r} has no head companion {self.name}.head.onnx (the "
                    "activations -> logits graph that ablationcam runs): export it again with "
                    "this camserve's 'camserve export', which writes it next to the model")
        usable = ", ".join(self.head_layers)
        return (f"layer {layer!r} of model {self.name!r} has no head in {self.name}.head.onnx: "
                "the network after it also reads tensors from before it (a skip connection "
                "crosses the cut), so its logits cannot be recomputed from its activations "
                f"alone; ablationcam can explain: {usable}")

    def warm_up(self) -> None:
        height, width = self.input_size
        image, targets = np.zeros((1, 3, height, width), np.float32), np.full((1, 1), -1, np.int64)
        self.run(image, targets, [layer.name for layer in self.card.layers])
        if self.saliency is not None:
            self.input_gradients(image, targets)
        for layer in self.head_layers:
            self.head_logits(layer, np.zeros((1, *self.card.layer(layer).shape), np.float32))


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


def read_saliency_card(model: onnx.ModelProto, source: str) -> tuple[ModelCard, str]:
    """A saliency companion's card and the name of its model, after checking its inputs
    and outputs against the companion contract."""
    card, owner = _companion_card(model, source, contract.SALIENCY)
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    for name in (contract.IMAGE, contract.TARGETS):
        if name not in inputs:
            raise ContractError(f"{source}: input {name!r} is missing")
    missing = [n for n in (contract.LOGITS, contract.CLASSES, contract.INPUT_GRADIENTS)
               if n not in outputs]
    if missing:
        raise ContractError(f"{source}: outputs {missing} are missing")
    height, width = card.preprocessing.crop
    image = [d.dim_value for d in inputs[contract.IMAGE].type.tensor_type.shape.dim]
    grads = [d.dim_value for d in outputs[contract.INPUT_GRADIENTS].type.tensor_type.shape.dim]
    if len(image) != 4 or image[1:] != [3, height, width]:
        raise ContractError(f"{source}: input 'image' is not [B,3,{height},{width}]")
    if len(grads) != 5 or grads[2:] != [3, height, width]:
        raise ContractError(f"{source}: output {contract.INPUT_GRADIENTS!r} is not "
                            f"[B,K,3,{height},{width}]")
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
        if outputs.get(output, [])[1:] != [len(card.labels)]:
            raise ContractError(f"{source}: output {output!r} [B,{len(card.labels)}] is missing")
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


def run_bound(session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray],
              options: ort.RunOptions | None = None) -> list[np.ndarray]:
    """What ``session.run(names, feeds, options)`` returns, run through IO binding.

    Each feed (a host array of the input's dtype and shape, e.g. image float32 [B,3,H,W]) is
    bound from host memory: onnxruntime copies it to the session's device once, when it is
    bound. Each output in ``names`` is bound to that device without a buffer, so onnxruntime
    allocates it there (from its arena) at the shape the run gives it; after the run all of
    them are copied to new host arrays at once, in the order of ``names``. One binding per
    call: concurrent calls share nothing but the session.
    """
    device, device_id = _device_of(session)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in names:
        binding.bind_output(name, device, device_id)
    session.run_with_iobinding(binding, options)
    return binding.copy_outputs_to_cpu()


def _device_of(session: ort.InferenceSession) -> tuple[str, int]:
    """(IO binding device type, device id) of the provider the session runs on first."""
    if session.get_providers()[0] == CUDA:
        return "cuda", int(session.get_provider_options()[CUDA].get("device_id", 0))
    return "cpu", 0


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


def load_model(path: Path, device: str = "auto", threads: int | None = None,
               io_binding: bool | None = None) -> ExplainerModel:
    """Validate and open one explainer file, with its saliency and head companions when they
    lie next to it; raises ContractError for a file that isn't an explainer.

    ``io_binding`` (``ExplainerModel.io_binding``): None means on for the CUDA provider, off
    for the CPU."""
    return _open_model(Path(path), device, threads, io_binding)


def accepts_no_targets(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> bool:
    """Whether the explainer graph runs with K = 0 targets: every Reshape computing its shape
    keeps empty dimensions (``allowzero=1``, written by ``camserve export`` since this
    version). Reshapes with a constant shape are fine either way."""
    constants = outer | {init.name for init in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH and not accepts_no_targets(attr.g,
                                                                                 constants):
                return False
        if node.op_type == "Reshape" and node.input[1] not in constants and not any(
                a.name == "allowzero" and a.i == 1 for a in node.attribute):
            return False
    return True


def _read(path: Path) -> tuple[onnx.ModelProto, str]:
    """The model's protobuf, without its external data, after checking that every external
    data file it names lies inside its own folder (no ``../`` or absolute paths); and the
    file's version (the first 12 hex digits of its SHA-256), from the same read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ContractError(f"{path.name}: cannot be read ({exc.strerror or exc})") from exc
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises various kinds
        raise ContractError(f"{path.name}: not an ONNX model ({type(exc).__name__})") from exc
    folder = path.parent.resolve()
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ContractError(f"{path.name}: weight {tensor.name!r} points at external data "
                                f"{location!r} outside the models folder; refused")
    return model, hashlib.sha256(data).hexdigest()[:12]


def _tensors(graph: onnx.GraphProto):
    """Every tensor stored in a graph: initializers and Constant values, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attribute.g)


def _companion_owner(model: onnx.ModelProto) -> tuple[str, str] | None:
    """(model, kind) of a companion file, None for a model."""
    return contract.companion_of({p.key: p.value for p in model.metadata_props})


def _check(model: onnx.ModelProto, source: str) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ContractError(f"{source}: fails onnx.checker: "
                            f"{str(exc).strip().splitlines()[0]}") from exc


def _open_model(path: Path, device: str, threads: int | None,
                io_binding: bool | None = None) -> ExplainerModel:
    model, digest = _read(path)
    owner = _companion_owner(model)
    if owner is not None:
        raise CompanionFileError(f"{path.name} is the {owner[1]} companion of model "
                                 f"{owner[0]!r}, not a model of its own")
    card = read_card(model, path.name)
    _check(model, path.name)
    empty_targets = accepts_no_targets(model.graph)
    del model
    session, provider = open_session(path, device, threads)
    loaded = ExplainerModel(path.stem, digest, card, session, provider,
                            io_binding=provider == CUDA if io_binding is None else io_binding,
                            empty_targets=empty_targets)
    companion = contract.companion_path(path)
    if companion.is_file():
        try:
            loaded.saliency = _open_companion(companion, contract.SALIENCY, loaded, device,
                                              threads)[0]
        except DeviceError:
            raise
        except CamserveError as exc:
            log.error("ignoring %s: %s", companion.name, exc)
    head = contract.companion_path(path, contract.HEAD)
    if head.is_file():
        try:
            loaded.head, loaded.head_layers = _open_companion(head, contract.HEAD, loaded,
                                                              device, threads)
        except DeviceError:
            raise
        except CamserveError as exc:
            log.error("ignoring %s: %s", head.name, exc)
    return loaded


def _open_companion(path: Path, kind: str, owner: ExplainerModel, device: str,
                    threads: int | None) -> tuple[ort.InferenceSession, tuple[str, ...]]:
    """A companion's session (and for a head companion the layers it holds), after checking
    it against the contract and its model."""
    model, _ = _read(path)
    if kind == contract.HEAD:
        card, name, layers = read_head_card(model, path.name)
        again = "again"
    else:
        (card, name), layers = read_saliency_card(model, path.name), ()
        again = "again with --input-gradients"
    if card != owner.card:
        raise ContractError(f"its metadata (architecture, labels, preprocessing, layers) "
                            f"differs from model {owner.name!r}'s; export both {again}")
    if name != owner.name:
        log.warning("%s says it belongs to model %r; attaching it to %r, the file next to it",
                    path.name, name, owner.name)
    _check(model, path.name)
    del model
    return open_session(path, device, threads)[0], layers


def load_models(folder: Path, device: str = "auto", threads: int | None = None,
                refused: list[str] | None = None, io_binding: bool | None = None
                ) -> dict[str, ExplainerModel]:
    """Every valid explainer in ``folder`` by file stem; invalid files are refused and logged
    (and, given a ``refused`` list, added to it as "file: why").

    Companions are attached to their models (``ExplainerModel.saliency``, ``.head``), not
    served on their own; one whose model is missing or refused is logged and ignored.
    Raises CamserveError when the folder holds no usable model. ``io_binding`` as for
    ``load_model``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CamserveError(f"models folder {str(folder)!r} does not exist; "
                            "run 'camserve export' first")
    models: dict[str, ExplainerModel] = {}
    companions: list[Path] = []
    files = sorted(folder.glob("*.onnx"))
    # <model>.<kind>.onnx beside <model>.onnx is read once, when its model attaches it
    beside = {contract.companion_path(path, kind) for path in files
              for kind in contract.COMPANION_KINDS}
    for path in files:
        if path in beside:
            companions.append(path)
            continue
        try:
            model = _open_model(path, device, threads, io_binding)
        except CompanionFileError:
            companions.append(path)
            continue
        except DeviceError:
            raise
        except CamserveError as exc:
            log.error("refusing %s: %s", path.name, exc)
            if refused is not None:
                refused.append(f"{path.name}: {str(exc).removeprefix(path.name + ': ')}")
            continue
        model.warm_up()
        log.info("model %s (%s, %d classes, layers %s%s%s) runs on %s", model.name,
                 model.card.architecture, model.num_classes,
                 ",".join(layer.name for layer in model.card.layers),
                 "; with input gradients" if model.saliency is not None else "",
                 f"; heads of {','.join(model.head_layers)}" if model.head_layers else "",
                 model.provider)
        models[model.name] = model
    tried = {contract.companion_path(folder / f"{name}.onnx", kind)
             for name in models for kind in contract.COMPANION_KINDS}
    for path in companions:
        if path not in tried:  # (a companion of a loaded model was attached or said why not)
            log.error("ignoring %s: a companion is used only with its model <model>.onnx "
                      "beside it as <model>.<kind>.onnx, and no loaded model is there",
                      path.name)
    if not models:
        raise CamserveError(f"no explainer graph in {str(folder)!r} passed validation; "
                            "export one with 'camserve export --out DIR'")
    return models
