"""The ``camserve.v1.Explainer`` gRPC service: request -> image -> graph -> maps -> response.

Every request is validated at the edge; what a client sent can only produce a status with a
message a person can act on (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED), never a
crash or UNKNOWN.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import grpc

from camserve.errors import CamserveError, DeadlineError, LimitError, NotFoundError
from camserve.server import attributions, cam
from camserve.server.batching import Batcher
from camserve.server.metrics import Metrics
from camserve.server.models import ExplainerModel
from camserve.server.pipeline import Limits, Pipeline
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

log = logging.getLogger("camserve.server")
access_log = logging.getLogger("camserve.access")  # one logfmt line per Explain call


def status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, LimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, DeadlineError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, CamserveError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class ExplainerService(pb_grpc.ExplainerServicer):
    """Serves the loaded models; ``default`` answers requests that name none."""

    def __init__(self, models: dict[str, ExplainerModel], default: str | None = None,
                 limits: Limits | None = None, batchers: dict[str, Batcher] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.models = models
        self.default = default or sorted(models)[0]
        self.pipeline = Pipeline(limits or Limits())
        self.batchers = batchers or {}  # model name -> its dynamic batcher, when batching
        self.metrics = metrics or Metrics()

    # --- RPCs -----------------------------------------------------------------------------
    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext):
        self.metrics.in_flight.inc()
        code = grpc.StatusCode.OK
        started = time.perf_counter()
        try:
            return self._measured(self.explain(request, context.is_active))
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a status
            code = status_of(exc)
            self._abort(context, exc, request.request_id)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels("Explain", code.name).inc()
            access_log.info("rpc=Explain request_id=%s model=%s method=%s code=%s ms=%.1f",
                            request.request_id or "-", request.model or self.default,
                            request.method or "gradcam", code.name,
                            (time.perf_counter() - started) * 1e3)

    def ExplainStream(self, requests: Iterator[pb.ExplainRequest],
                      context: grpc.ServicerContext):
        for request in requests:
            try:
                response = self._measured(self.explain(request, context.is_active))
                self.metrics.requests.labels("ExplainStream", "OK").inc()
                yield response
            except Exception as exc:  # noqa: BLE001 -- one bad frame must not end the stream
                code = status_of(exc)
                self.metrics.requests.labels("ExplainStream", code.name).inc()
                self._log_failure(exc, code, request.request_id)
                yield pb.ExplainResponse(request_id=request.request_id,
                                         error=pb.Error(code=code.value[0], message=str(exc)))

    def _measured(self, response: pb.ExplainResponse) -> pb.ExplainResponse:
        t = response.timings
        self.metrics.observe_timings(t.decode_us, t.preprocess_us, t.inference_us,
                                     t.postprocess_us)
        return response

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext):
        return pb.ListModelsResponse(models=[self.model_info(m) for _, m in
                                             sorted(self.models.items())],
                                     default_model=self.default)

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext):
        try:
            return self.model_info(self.model(request.name))
        except Exception as exc:  # noqa: BLE001
            self._abort(context, exc, "")

    # set by camserve.server.app: () -> ReloadModelsResponse; loads the models folder again
    # and swaps it in (``swap``), raising CamserveError when it holds no usable model
    reloader = None

    def ReloadModels(self, request: pb.ReloadModelsRequest, context: grpc.ServicerContext):
        if self.reloader is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "this server was not started with a models folder to reload")
        try:
            return self.reloader()
        except CamserveError as exc:
            log.warning("reload refused, the old models stay: %s", exc)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{exc}; still serving: {', '.join(sorted(self.models))}")
        except Exception as exc:  # noqa: BLE001
            self._abort(context, exc, "")

    def swap(self, models: dict[str, ExplainerModel], default: str | None,
             batchers: dict[str, Batcher]) -> dict[str, Batcher]:
        """Serve ``models`` from the next request on; returns the batchers they replace (the
        caller closes them once their requests are done). A request never finds neither set:
        the union is served while the attributes change."""
        old = self.batchers
        self.models = {**self.models, **models}
        self.default = default or sorted(models)[0]
        self.batchers = batchers
        self.models = models
        return old

    # --- the pipeline ---------------------------------------------------------------------
    def model(self, name: str) -> ExplainerModel:
        name = name or self.default
        if name not in self.models:
            raise NotFoundError(f"unknown model {name!r}; this server has: "
                                f"{', '.join(sorted(self.models))}")
        return self.models[name]

    def explain(self, request: pb.ExplainRequest,
                alive: Callable[[], bool] = lambda: True) -> pb.ExplainResponse:
        """Answer one request; ``alive`` says whether its caller still waits (a request
        whose deadline passed or that was cancelled is dropped before the graph runs)."""
        model = self.model(request.model)
        batcher = self.batchers.get(model.name)
        if batcher is not None and batcher.model is not model:
            batcher = None  # read across a reload: run this model directly
        if batcher is not None:
            batcher.expect()  # a batch may wait for this request while it decodes
        try:
            job = self.pipeline.prepare(request, model)
            if not alive():
                raise DeadlineError("the caller gave up before the model ran")
        except BaseException:
            if batcher is not None:
                batcher.cancel()
            raise
        if batcher is not None:
            outputs = batcher.run(job.image, job.targets, job.layers, alive)
        else:
            outputs = model.run(job.image, job.targets[None, :], job.layers)
        job.inferred = time.perf_counter_ns()
        return self.pipeline.respond(request, model, job, outputs)

    def model_info(self, model: ExplainerModel) -> pb.ModelInfo:
        card = model.card
        p = card.preprocessing
        return pb.ModelInfo(
            name=model.name, version=model.version, architecture=card.architecture,
            labels=card.labels, input_shape=[1, 3, *model.input_size],
            preprocessing=pb.Preprocessing(
                resize=p.resize, crop_height=p.crop[0], crop_width=p.crop[1], mean=p.mean,
                std=p.std, scale=p.scale, channel_order=p.channel_order,
                interpolation=p.interpolation, grayscale=p.grayscale),
            layers=[pb.LayerInfo(name=layer.name, shape=layer.shape) for layer in card.layers],
            methods=[m for m in cam.method_names() if m != "ablationcam" or model.head]
            + (list(attributions.METHODS) if model.saliency else []),
            contract_version=card.contract_version,
            execution_provider=model.provider, camserve_version=card.camserve_version)

    # --- errors ---------------------------------------------------------------------------
    def _abort(self, context: grpc.ServicerContext, exc: Exception, request_id: str) -> None:
        code = status_of(exc)
        self._log_failure(exc, code, request_id)
        message = str(exc) if code != grpc.StatusCode.INTERNAL else \
            f"internal error ({type(exc).__name__}); the server logged the details"
        context.abort(code, message)

    @staticmethod
    def _log_failure(exc: Exception, code: grpc.StatusCode, request_id: str) -> None:
        if code == grpc.StatusCode.INTERNAL:
            log.exception("request %r failed", request_id, exc_info=exc)
        else:
            log.info("request %r refused (%s): %s", request_id, code.name, exc)
