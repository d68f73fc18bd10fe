"""A stand-in for NVIDIA Triton in the tests: a Triton model repository served over KServe v2
gRPC with onnxruntime.

Triton itself ships as a container, not a wheel, so the tests cannot start it. This server
speaks Triton's own gRPC protocol (the ``inference.GRPCInferenceService`` stubs shipped in
``tritonclient``) and honours what a ``config.pbtxt`` says the way Triton does: it parses the
file with Triton's ``ModelConfig`` protobuf, loads ``NAME/<version>/model.onnx`` with
onnxruntime, and refuses a request whose inputs do not match the configured names, data types
and dims (-1 = any) or whose batch exceeds ``max_batch_size``. Only what the camserve client
uses is implemented.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

# KServe v2 datatype <-> numpy, for the types the explainer graph uses
_NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}
_DATATYPE = {mc.TYPE_FP32: "FP32", mc.TYPE_FP16: "FP16", mc.TYPE_INT64: "INT64",
             mc.TYPE_INT32: "INT32"}


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Model:
    config: mc.ModelConfig
    version: str
    session: ort.InferenceSession


def load_config(path: Path) -> mc.ModelConfig:
    """config.pbtxt -> Triton's ModelConfig (raises text_format.ParseError on a bad file)."""
    return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())


class TritonStandIn(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Path) -> None:
        self.models: dict[str, _Model] = {}
        for config_path in sorted(Path(repository).glob("*/config.pbtxt")):
            config = load_config(config_path)
            versions = sorted((p for p in config_path.parent.iterdir() if p.name.isdigit()),
                              key=lambda p: int(p.name))
            session = ort.InferenceSession(str(versions[-1] / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
            self.models[config.name or config_path.parent.name] = _Model(
                config, versions[-1].name, session)

    # --- RPCs -----------------------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.models)

    def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=name, version=m.version, state="READY")
            for name, m in sorted(self.models.items())])

    def ModelConfig(self, request, context):
        model = self._model(request.name, context)
        return pb.ModelConfigResponse(config=model.config)

    def ModelInfer(self, request, context):
        model = self._model(request.model_name, context)
        try:
            feeds = self._feeds(request, model.config)
            names = [o.name for o in request.outputs] or [o.name for o in model.config.output]
            known = {o.name for o in model.config.output}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unexpected inference output '{unknown[0]}' for model "
                              f"'{request.model_name}'")
            values = model.session.run(names, feeds)
        except Refused as exc:
            context.abort(exc.code, str(exc))
        response = pb.ModelInferResponse(model_name=request.model_name,
                                         model_version=model.version, id=request.id)
        for name, value in zip(names, values):
            datatype = next(k for k, v in _NUMPY.items() if np.dtype(v) == value.dtype)
            response.outputs.add(name=name, datatype=datatype, shape=list(value.shape))
            response.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
        return response

    # --- helpers --------------------------------------------------------------------------
    def _model(self, name: str, context) -> _Model:
        if name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Request for unknown model: '{name}' is not found")
        return self.models[name]

    @staticmethod
    def _feeds(request, config: mc.ModelConfig) -> dict[str, np.ndarray]:
        specs = {i.name: i for i in config.input}
        if len(request.raw_input_contents) != len(request.inputs):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents must hold one "
                          "entry per input")
        feeds = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents):
            spec = specs.get(tensor.name)
            if spec is None:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unexpected inference input '{tensor.name}'")
            expected = _DATATYPE[spec.data_type]
            if tensor.datatype != expected:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input '{tensor.name}' data-type is '{tensor.datatype}', the "
                              f"model expects '{expected}'")
            shape = list(tensor.shape)
            batch, dims = shape[0], shape[1:]
            if not 1 <= batch <= config.max_batch_size:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"inference request batch-size must be <= "
                              f"{config.max_batch_size}, got {batch}")
            if len(dims) != len(spec.dims) or any(d != -1 and d != n
                                                  for d, n in zip(spec.dims, dims)):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input '{tensor.name}' has shape {dims} beyond the batch; the "
                              f"model expects {list(spec.dims)}")
            array = np.frombuffer(raw, _NUMPY[expected])
            if array.size != int(np.prod(shape)):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input '{tensor.name}' holds {array.size} elements for shape "
                              f"{shape}")
            feeds[tensor.name] = array.reshape(shape)
        missing = set(specs) - set(feeds)
        if missing:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"expected inputs {sorted(specs)}, missing {sorted(missing)}")
        return feeds


def serve(repository: Path) -> tuple[grpc.Server, int]:
    """Start the stand-in on a free loopback port: (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(TritonStandIn(repository), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
