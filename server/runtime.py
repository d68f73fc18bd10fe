"""Explainer graphs on onnxruntime: load a models folder, run the graphs.

``load_models`` opens every ``*.onnx`` file in a folder, has ``camserve.modelfile`` check it
against graph contract v1 (inputs, outputs, metadata) and creates one onnxruntime session per
model, on the CUDA provider when asked and available, else on the CPU.

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

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from camserve import contract, modelfile
from camserve.contract import ModelCard
from camserve.errors import CallerError, CamserveError, OperatorError
from camserve.modelfile import CompanionFileError

log = logging.getLogger("camserve.server")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


class DeviceError(OperatorError):
    """The requested execution device cannot be used."""


class MissingCompanionError(CallerError):
    """A method was asked of a model exported without the companion it needs."""


@dataclass
class ExplainerModel:
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
        """The ``gradients_of`` callable of ``camserve.explain.attributions``: batch float32
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
        height, width = self.card.input_size
        channels = self.card.preprocessing.channels  # 1 for a one-channel model
        image = np.zeros((1, channels, height, width), np.float32)
        targets = np.full((1, 1), -1, np.int64)
        self.run(image, targets, [layer.name for layer in self.card.layers])
        if self.saliency is not None:
            self.input_gradients(image, targets)
        for layer in self.head_layers:
            self.head_logits(layer, np.zeros((1, *self.card.layer(layer).shape), np.float32))


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


_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def register_shared_cpu_arena() -> None:
    """Give this process one CPU memory arena for every session that opts in (idempotent).

    Each session would otherwise keep an arena of its own: a server with several models,
    or one that reloaded a new version, held each one's high-water mark. One shared arena
    holds about the most any mix of runs took at once (it grows by doubling), which is what
    the memory budget counts (``lifecycle.MemoryBudget``)."""
    global _shared_arena_registered
    with _shared_arena_lock:
        if _shared_arena_registered:
            return
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                   ort.OrtMemType.DEFAULT)
        # onnxruntime's own arena settings: growing by what a run asks for, instead of by
        # doubling, kept more (make bench-arena: 379 vs 308 MiB after batches of 16), as
        # the many exact-size regions it makes cannot serve a larger tensor together
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg({}))
        _shared_arena_registered = True


def session_options(threads: int | None, cpu_arena: bool = True) -> ort.SessionOptions:
    """onnxruntime settings of every session we open: ``threads`` intra-op threads (None:
    onnxruntime's choice) and the process's shared CPU memory arena
    (``register_shared_cpu_arena``) unless ``cpu_arena`` is False.

    The arena keeps what it took, so the memory of one request's graph run is not there
    for the next request's NumPy arrays: the memory budget counts what it holds
    (``lifecycle.MemoryBudget``). Without it, intermediate tensors are fresh pages on every
    run, and with the server's malloc settings (``lifecycle.return_freed_memory``) that
    costs: ``make bench-arena`` measures it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = cpu_arena
    if cpu_arena:
        register_shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def open_session(path: Path, device: str, threads: int | None, cpu_arena: bool = True
                 ) -> tuple[ort.InferenceSession, str]:
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
        session = ort.InferenceSession(str(path), session_options(threads, cpu_arena),
                                       providers=providers)
    finally:
        ort.set_default_logger_severity(3)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        raise DeviceError("--device cuda: onnxruntime found no working CUDA GPU (needs "
                          "onnxruntime-gpu with CUDA 13 and cuDNN 9); use --device cpu or auto")
    return session, provider


def load_model(path: Path, device: str = "auto", threads: int | None = None,
               io_binding: bool | None = None, *, cpu_arena: bool = True) -> ExplainerModel:
    """Validate and open one explainer file, with its saliency and head companions when they
    lie next to it; raises ContractError for a file that isn't an explainer.

    ``io_binding`` (``ExplainerModel.io_binding``): None means on for the CUDA provider, off
    for the CPU."""
    return _open_model(Path(path), device, threads, io_binding, cpu_arena)


def _open_model(path: Path, device: str, threads: int | None,
                io_binding: bool | None = None, cpu_arena: bool = True) -> ExplainerModel:
    found = modelfile.explainer(modelfile.read(path))
    session, provider = open_session(path, device, threads, cpu_arena)
    loaded = ExplainerModel(found.name, found.version, found.card, session, provider,
                            io_binding=provider == CUDA if io_binding is None else io_binding,
                            empty_targets=found.empty_targets)
    for kind in contract.COMPANION_KINDS:
        companion = contract.companion_path(path, kind)
        if not companion.is_file():
            continue
        try:
            session, layers = _open_companion(companion, kind, found, device, threads,
                                              cpu_arena)
        except DeviceError:
            raise
        except CamserveError as exc:
            log.error("ignoring %s: %s", companion.name, exc)
            continue
        if kind == contract.HEAD:
            loaded.head, loaded.head_layers = session, layers
        else:
            loaded.saliency = session
    return loaded


def _open_companion(path: Path, kind: str, owner: modelfile.Explainer, device: str,
                    threads: int | None, cpu_arena: bool = True
                    ) -> tuple[ort.InferenceSession, tuple[str, ...]]:
    """A companion's session (and for a head companion the layers it holds), after checking
    it against the contract and its model."""
    name, layers = modelfile.companion(modelfile.read(path), kind, owner)
    if name != owner.name:
        log.warning("%s says it belongs to model %r; attaching it to %r, the file next to it",
                    path.name, name, owner.name)
    return open_session(path, device, threads, cpu_arena)[0], layers


def load_models(folder: Path, device: str = "auto", threads: int | None = None,
                refused: list[str] | None = None, io_binding: bool | None = None, *,
                cpu_arena: bool = True) -> dict[str, ExplainerModel]:
    """Every valid explainer in ``folder`` by file stem; invalid files are refused and logged
    (and, given a ``refused`` list, added to it as "file: why").

    Companions are attached to their models (``ExplainerModel.saliency``, ``.head``), not
    served on their own; one whose model is missing or refused is logged and ignored.
    Raises CamserveError when the folder holds no usable model. ``io_binding`` as for
    ``load_model``; ``cpu_arena`` as for ``session_options``.
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
            model = _open_model(path, device, threads, io_binding, cpu_arena)
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
                 model.card.architecture, model.card.num_classes,
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
