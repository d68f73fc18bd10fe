"""``export_explainer``: a PyTorch classifier becomes one explainer ONNX file (contract v1)."""

from __future__ import annotations

import os
import re
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx_ad import UnsupportedOperator

import camserve
from camserve import contract
from camserve.contract import Layer, ModelCard, Preprocessing
from camserve.errors import OperatorError
from camserve.export import layers
from camserve.export import precision as fp16
from camserve.export.common import OPSET, GraphBuildError
from camserve.export.graph import (
    LayerTensors,
    build_explainer,
    build_head,
    build_saliency,
)


class ExportError(OperatorError):
    """The model cannot be exported as asked."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    card: ModelCard
    default_layer_chosen: bool
    companion: Path | None = None  # ``<stem>.saliency.onnx`` with ``input_gradients=True``
    head: Path | None = None  # ``<stem>.head.onnx``, unless no layer's head could be cut out
    head_layers: tuple[str, ...] = ()  # the layers the head companion holds


def export_explainer(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    target_layers: Sequence[str] | None = None,
    input_size: int | tuple[int, int] = 224,
    labels: Sequence[str] | None = None,
    preprocess: Preprocessing | None = None,
    architecture: str = "custom",
    input_gradients: bool = False,
    precision: str = contract.FLOAT32,
    output: str | int | None = None,
) -> ExportResult:
    """Write ``path``: the explainer graph of ``model`` with its metadata.

    ``model`` maps float32 [B,3,H,W] to logits [B,N] ([B,1,H,W] when ``preprocess`` says
    ``grayscale="single"``). ``target_layers`` are submodule
    names (default: the last convolutional block). ``input_size`` is H = W or (H, W);
    ``labels`` default to "class <i>"; ``preprocess`` defaults to the ImageNet evaluation
    transform at that size. The file appears whole or not at all.

    The head companion ``<stem>.head.onnx`` (each layer's activations -> logits, for
    Ablation-CAM, see ``camserve.contract``) is always written next to it, holding every
    layer whose head reads only that layer's activations (none: no file).

    With ``input_gradients`` the saliency companion ``<stem>.saliency.onnx`` (gradients of
    the class logits with respect to the image, see ``camserve.contract``) is written next
    to it. All the files appear or none does. A companion not written this time but left
    there by an earlier export is removed, so that it cannot be attached to a different
    network.

    ``precision="float16"`` writes every file with float16 weights and arithmetic, its
    inputs and outputs still float32 as the contract says (``camserve.export.precision``);
    the card's ``precision`` records it.

    ``output`` picks the logits out of a model that returns a tuple/list (an index) or a
    dict (a key); without it the model must return one tensor.

    A model that rejects the input size, an output that is not logits, a layer that is not
    a submodule, or an operator after the layer that onnx-ad cannot differentiate raise an
    ExportError (or LayerError) of one line that says what to change.
    """
    if precision not in contract.PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of: "
                          f"{', '.join(contract.PRECISIONS)}")
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    model = model.eval()
    channels = preprocess.channels if preprocess is not None else 3  # 1: grayscale single
    example = torch.zeros(1, channels, height, width)
    try:
        found = layers.candidates(model, example)
    except Exception as exc:  # whatever the network raises for an input it does not take
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
        hint = ("pass the size it was built for (--input-size or --crop)"
                if "channel" not in last else "a one-channel model: --grayscale single"
                if channels == 3 else "the model takes three channels: drop --grayscale single")
        raise ExportError(f"the model rejects an input of size [1,{channels},{height},"
                          f"{width}] ({last}); {hint}") from exc
    chosen_default = not target_layers
    names = [layers.default_layer(found)] if chosen_default else list(target_layers or [])
    chosen = layers.check_layers(names, found, [n for n, _ in model.named_modules() if n])
    card = _card(model, example, chosen, names, labels, preprocess, architecture, precision,
                 output)

    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"output folder {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"output folder {str(path.parent)!r} is not writable")
    with tempfile.TemporaryDirectory(prefix="camserve-export-") as scratch:
        forward = _export_forward(model, names, example, Path(scratch) / "forward.onnx",
                                  output)
        tensors = [LayerTensors(f"camserve_layer_{i}", layer.activations, layer.gradients)
                   for i, layer in enumerate(card.layers)]
        try:
            explainer = build_explainer(forward, tensors)
            saliency = build_saliency(forward) if input_gradients else None
        except GraphBuildError as exc:
            raise _not_differentiable(exc, forward, names, model) from exc
        head, left_out = build_head(forward, tensors, contract.head_output_names(names))
    if precision == contract.FLOAT16:
        explainer, saliency, head = _to_float16(explainer, saliency, head, card)
    head_layers = tuple(layer.name for layer in card.layers if layer.activations not in left_out)
    companion, head_path = _write_files(path, card, explainer, saliency, head, head_layers)
    return ExportResult(path, card, chosen_default, companion, head_path, head_layers)


def select_output(value, output: str | int | None, check: bool = False):
    """The logits out of what a model returned: ``value`` itself (``output`` None), its
    item ``output`` (tuple/list: an index, dict: a key). With ``check`` a bad ``output``
    or a non-tensor result raises ExportError naming the choices."""
    if output is None:
        if check and isinstance(value, (tuple, list, dict)):
            if isinstance(value, dict):
                choices = ", ".join(f"{k!r}{_shape_text(v)}" for k, v in value.items())
                what = f"a dict with keys {choices}"
                how = "--output KEY"
            else:
                choices = ", ".join(f"{i}{_shape_text(v)}" for i, v in enumerate(value))
                what = f"a {type(value).__name__} of {len(value)} ({choices})"
                how = "--output INDEX"
            raise ExportError(f"the model returns {what}, not one logits tensor; pick the "
                              f"logits with {how}")
        return value
    if isinstance(value, dict):
        key = output if output in value else str(output)
        if check and key not in value:
            raise ExportError(f"--output {output!r}: the model's dict has no such key; its "
                              f"keys: {', '.join(repr(k) for k in value)}")
        return value[key]
    if isinstance(value, (tuple, list)):
        try:
            index = int(output)
            picked = value[index]
        except (ValueError, IndexError) as exc:
            if check:
                raise ExportError(f"--output {output!r}: the model returns a "
                                  f"{type(value).__name__} of {len(value)}; give an index "
                                  f"from 0 to {len(value) - 1}") from exc
            raise
        return picked
    if check:
        raise ExportError(f"--output {output!r} given, but the model returns a single "
                          f"{type(value).__name__}; leave --output out")
    return value


def _shape_text(value) -> str:
    return f" {list(value.shape)}" if isinstance(value, torch.Tensor) else \
        f" ({type(value).__name__})"


def _card(model: torch.nn.Module, example: torch.Tensor, chosen: list[layers.Candidate],
          names: list[str], labels: Sequence[str] | None, preprocess: Preprocessing | None,
          architecture: str, precision: str, output: str | int | None = None) -> ModelCard:
    """The metadata of the export (see ``export_explainer`` for the defaults); raises
    ExportError when ``model`` does not return logits [B,N] matching ``labels``."""
    with torch.no_grad():
        logits = select_output(model(example), output, check=True)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = f" {list(logits.shape)}" if isinstance(logits, torch.Tensor) else ""
        raise ExportError("the model must return one logits tensor [B,N]; "
                          f"it returned {type(logits).__name__}{shape}")
    num_classes = int(logits.shape[1])
    labels = list(labels) if labels is not None else [f"class {i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels given, but the model's logits have "
                          f"{num_classes} classes")
    height, width = example.shape[2:]
    preprocess = preprocess or Preprocessing(resize=round(min(height, width) * 256 / 224),
                                             crop=(height, width))
    return ModelCard(
        architecture=architecture, labels=tuple(labels), preprocessing=preprocess,
        layers=tuple(Layer(c.name, act, grad, c.shape)
                     for c, (act, grad) in zip(chosen, contract.layer_output_names(names))),
        camserve_version=camserve.__version__, precision=precision)


def _write_files(path: Path, card: ModelCard, explainer: onnx.ModelProto,
                 saliency: onnx.ModelProto | None, head: onnx.ModelProto | None,
                 head_layers: tuple[str, ...]) -> tuple[Path | None, Path | None]:
    """Write the explainer at ``path`` and the companions next to it, each with its
    metadata, all or none; remove a companion an earlier export left there that this one
    does not write. Returns the paths of the companions written (None: not written)."""
    files = [(explainer, path)]
    _add_metadata(explainer, card.to_metadata(),
                  f"camserve explainer for {card.architecture} (graph contract v1)")
    companion = contract.companion_path(path)
    if saliency is not None:
        _add_metadata(saliency, {**card.to_metadata(), **contract.companion_metadata(path.stem)},
                      f"camserve saliency companion of {path.name} (input gradients)")
        files.append((saliency, companion))
    head_path = contract.companion_path(path, contract.HEAD)
    if head is not None:
        _add_metadata(head, {**card.to_metadata(),
                             **contract.companion_metadata(path.stem, contract.HEAD)},
                      f"camserve head companion of {path.name} (activations -> logits of "
                      f"layers {', '.join(head_layers)})")
        files.append((head, head_path))
    _write_atomically(files)
    for written, stale in ((saliency, companion), (head, head_path)):
        if written is None and stale.is_file():
            stale.unlink()  # it belongs to an earlier export of this name
    return (companion if saliency is not None else None,
            head_path if head is not None else None)


def _to_float16(explainer: onnx.ModelProto, saliency: onnx.ModelProto | None,
                head: onnx.ModelProto | None, card: ModelCard):
    """The three graphs in float16 (gradient outputs through scaled seeds)."""
    try:
        return (fp16.to_float16(explainer, [layer.gradients for layer in card.layers]),
                fp16.to_float16(saliency, [contract.INPUT_GRADIENTS]) if saliency else None,
                fp16.to_float16(head) if head else None)
    except fp16.PrecisionError as exc:
        raise ExportError(f"cannot write this model in float16: {exc}") from exc


def _add_metadata(model: onnx.ModelProto, metadata: dict[str, str], doc: str) -> None:
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = doc


def _not_differentiable(exc: GraphBuildError, forward: onnx.ModelProto, names: list[str],
                        model: torch.nn.Module) -> ExportError:
    """The one-line error for a head onnx-ad cannot differentiate: the ONNX operator and,
    from the exporter's node name (``/features/norm/LRN``), the PyTorch module."""
    cause = exc.__cause__
    text = " ".join(str(cause if isinstance(cause, UnsupportedOperator) else exc).split())
    match = re.search(r"for (\w+) \(node '([^']*)'\)", text)
    if match is None:
        return ExportError(f"cannot differentiate the network after layer(s) "
                           f"{', '.join(names)}: {text}")
    op_type, node = match.groups()
    where = ""
    modules = dict(model.named_modules())
    name = ""
    for part in [p for p in node.split("/") if p][:-1]:  # scopes: full or relative names
        joined = f"{name}.{part}" if name else part
        name = joined if joined in modules else part if part in modules else name
    if name:
        where = f", in PyTorch module {name!r} ({type(modules[name]).__name__})"
    return ExportError(f"cannot differentiate the network after layer(s) {', '.join(names)}: "
                       f"onnx-ad has no derivative for the ONNX operator {op_type} (node "
                       f"{node!r}{where}); explain a layer after it (--layer) or replace "
                       "that operation")


def _export_forward(model: torch.nn.Module, names: list[str], example: torch.Tensor,
                    scratch: Path, output: str | int | None = None) -> onnx.ModelProto:
    """The forward graph: image -> logits, camserve_layer_0, camserve_layer_1, ..."""

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor):
            with layers.capture(self.model, names) as store:
                logits = select_output(self.model(image), output)
            return (logits, *[store[n] for n in names])

    wrapper = Forward().eval()
    outputs = [contract.LOGITS] + [f"camserve_layer_{i}" for i in range(len(names))]
    axes = {name: {0: "B"} for name in [contract.IMAGE] + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(scratch), dynamo=False,
                          input_names=[contract.IMAGE], output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=True)
    model.eval()  # the exporter restores training flags; keep the model as we found it
    return onnx.load(str(scratch))


def _write_atomically(files: list[tuple[onnx.ModelProto, Path]]) -> None:
    """Write every (model, path): all the files appear whole, or none of them does."""
    temps: list[Path] = []
    written: list[Path] = []
    try:
        for model, path in files:
            temps.append(_write_temp(model, path))
        for temp, (_, path) in zip(temps, files):
            try:
                os.replace(temp, path)
            except OSError as exc:
                raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
            written.append(path)
    except BaseException:
        for leftover in temps + written:
            leftover.unlink(missing_ok=True)
        raise


_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` would give a new file (mkstemp's
    temporary files are 0600). Reading the umask means setting it, hence the lock."""
    with _UMASK_LOCK:
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _write_temp(model: onnx.ModelProto, path: Path) -> Path:
    """``model`` saved to a hidden temporary file next to ``path``."""
    if model.ByteSize() > 2**31 - 1:
        raise ExportError(f"the graph for {path.name} is over 2 GB, the limit of a single "
                          "ONNX file")
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial",
                                        dir=path.parent)
    except OSError as exc:
        raise ExportError(f"cannot write into {str(path.parent)!r}: {exc.strerror}") from exc
    os.close(handle)
    try:
        os.chmod(temp, default_file_mode())  # mkstemp's 0600 would survive the rename
        onnx.save_model(model, temp)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)
