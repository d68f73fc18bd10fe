"""An exported explainer as an NVIDIA Triton model: ``REPO/NAME/1/model.onnx`` + ``config.pbtxt``.

The graph goes in unchanged (Triton's onnxruntime backend runs it); ``config.pbtxt`` names the
contract's inputs and outputs with their element types and dimensions (the batch dimension is
Triton's own, ``max_batch_size``; any other symbolic dimension, such as the number of targets
K, is -1), turns on dynamic batching, and carries the model card -- the explainer's
``metadata_props``, one ``parameters`` entry per key -- so that a client asking Triton for the
model's configuration learns its labels, preprocessing and layers
(``camserve.client.triton``). Companion files (saliency, head) are not part of the entry:
input-space methods and Ablation-CAM need ``camserve serve``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from camserve import contract, modelfile
from camserve.errors import ContractError, OperatorError
from camserve.export.explainer import default_file_mode
from camserve.modelfile import CompanionFileError
from camserve.onnxgraph import stored_tensors

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_QUEUE_DELAY_US = 2000

# ONNX element type -> Triton data type
_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
          onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
          onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.UINT8: "TYPE_UINT8"}


class TritonRepoError(OperatorError):
    """The file cannot become a Triton model (not an explainer, bad name, bad folder)."""


@dataclass(frozen=True)
class TritonModelFiles:
    """What ``write_triton_model`` wrote."""

    name: str
    model: Path  # REPO/NAME/1/model.onnx
    config: Path  # REPO/NAME/config.pbtxt


def write_triton_model(explainer: str | os.PathLike, repo: str | os.PathLike, *,
                       name: str | None = None, version: int = 1,
                       max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                       max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> TritonModelFiles:
    """Add the explainer file ``explainer`` to the Triton model repository ``repo`` as model
    ``name`` (default: the file's stem), version ``version``. An existing entry of that name
    and version is replaced; each file appears whole or not at all."""
    source = Path(explainer)
    name = name or source.stem
    if not name or name.startswith(".") or any(c in name for c in "/\\ \t\n"):
        raise TritonRepoError(f"{name!r} cannot be a Triton model name (a folder name "
                              "without slashes or spaces)")
    if max_batch_size < 1:
        raise TritonRepoError("max_batch_size must be >= 1: the explainer graph is batched")
    try:
        found = modelfile.explainer(modelfile.read(source))
    except CompanionFileError:
        raise TritonRepoError(f"{str(source)!r} is a companion file; give the explainer") from None
    except ContractError as exc:
        raise TritonRepoError(f"{str(source)!r} cannot become a Triton model: {exc}") from None
    model = found.file.proto
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored_tensors(model.graph)):
        raise TritonRepoError(f"{str(source)!r} keeps weights in external files; Triton's "
                              "entry needs one self-contained model.onnx")
    text = render_config(model, name, {**found.card.to_metadata(),
                                       contract.KEY_SHA256: found.version},
                         max_batch_size, max_queue_delay_us)

    folder = Path(repo) / name
    version_folder = folder / str(version)
    try:
        version_folder.mkdir(parents=True, exist_ok=True)
        _copy_atomically(source, version_folder / "model.onnx")
        _write_atomically(text, folder / "config.pbtxt")
    except OSError as exc:
        raise TritonRepoError(f"cannot write the Triton model into {str(folder)!r}: "
                              f"{exc.strerror or exc}") from exc
    return TritonModelFiles(name, version_folder / "model.onnx", folder / "config.pbtxt")


def render_config(model: onnx.ModelProto, name: str, parameters: dict[str, str],
                  max_batch_size: int, max_queue_delay_us: int) -> str:
    """config.pbtxt (protobuf text of Triton's ``inference.ModelConfig``) for the explainer
    graph ``model``: every graph input and output, without the batch dimension."""
    lines = [f"# Triton model configuration of a camserve explainer (graph contract "
             f"v{contract.CONTRACT_VERSION}); written by 'camserve export --triton-repo'",
             f"name: {_quote(name)}", 'backend: "onnxruntime"',
             f"max_batch_size: {max_batch_size}"]
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            data_type, dims = _tensor_spec(value)
            lines.append(f"{kind} {{ name: {_quote(value.name)} data_type: {data_type} "
                         f"dims: [{', '.join(str(d) for d in dims)}] }}")
    lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}")
    for key, value in parameters.items():
        lines.append(f"parameters {{ key: {_quote(key)} value {{ string_value: {_quote(value)} "
                     "} }")
    return "\n".join(lines) + "\n"


def _tensor_spec(value: onnx.ValueInfoProto) -> tuple[str, list[int]]:
    """(Triton data type, dims without the batch dimension; -1 where symbolic)."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in _TYPES:
        raise TritonRepoError(f"tensor {value.name!r} has ONNX element type "
                              f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, which this "
                              "exporter does not map to Triton")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not dims or dims[0] not in (-1, 0):
        raise TritonRepoError(f"tensor {value.name!r} has no symbolic batch dimension first "
                              f"(shape {dims}); Triton batches along it")
    return _TYPES[tensor.elem_type], dims[1:]


def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept, quotes and controls escaped)."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def _copy_atomically(source: Path, target: Path) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        os.chmod(temp, default_file_mode())  # mkstemp's 0600 would survive the rename
        shutil.copyfile(source, temp)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _write_atomically(text: str, target: Path) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        os.chmod(temp, default_file_mode())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
