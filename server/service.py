"""The ``camserve.v1.Explainer`` gRPC servicer: a thin layer over the transport-free pipeline.

Each RPC finds its model in the ``ModelRepository``, hands the request to
``camserve.explain.pipeline`` (validate -> preprocess -> graph -> maps) with the model's
runner, and turns the ``Explained`` result into the response. Every request is validated
at the edge: what a client sent can only produce a status with a message a person can act
on (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED), never a crash or UNKNOWN.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import grpc

from camserve.errors import CamserveError, status_name
from camserve.explain import attributions, frames, methods
from camserve.explain.budget import estimate
from camserve.explain.pipeline import Limits, Pipeline
from camserve.explain.response import to_response
from camserve.server.lifecycle import MemoryBudget
from camserve.server.metrics import Metrics
from camserve.server.repository import ModelRepository
from camserve.server.runtime import ExplainerModel
from camserve.server.streams import STATS_METADATA, FrameStream
from camserve.server.wire import Received
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

log = logging.getLogger("camserve.server")
access_log = logging.getLogger("camserve.access")  # one logfmt line per Explain call


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status a failed call answers with (``camserve.errors.status_name``)."""
    return grpc.StatusCode[status_name(exc)]


class ExplainerService(pb_grpc.ExplainerServicer):
    """Serves the models of ``repository`` with ``limits`` per request."""

    def __init__(self, repository: ModelRepository, limits: Limits | None = None,
                 metrics: Metrics | None = None) -> None:
        self.repository = repository
        self.pipeline = Pipeline(limits or Limits())
        self.metrics = metrics or repository.metrics
        # requests are admitted while their estimated peak memory fits (--max-inflight-mb)
        config = repository.config
        self.budget = MemoryBudget.from_mb(config.max_inflight_mb, arena_kept=config.cpu_arena)

    # --- RPCs -----------------------------------------------------------------------------
    def Explain(self, received: Received, context: grpc.ServicerContext):
        """``received``: the request as ``wire.ZeroCopyImageInterceptor`` parses it."""
        request = received.message
        self.metrics.in_flight.inc()
        code = grpc.StatusCode.OK
        started = time.perf_counter()
        try:
            return self._measured(self.explain(request, context.is_active, received.image))
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a status
            code = status_of(exc)
            self._abort(context, exc, request.request_id)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels("Explain", code.name).inc()
            access_log.info("rpc=Explain request_id=%s model=%s method=%s code=%s ms=%.1f",
                            request.request_id or "-",
                            request.model or self.repository.default,
                            request.method or methods.DEFAULT_METHOD, code.name,
                            (time.perf_counter() - started) * 1e3)

    def ExplainStream(self, requests: Iterator[Received], context: grpc.ServicerContext):
        """Frames through a ``streams.FrameStream`` (its StreamOptions: latest frame wins,
        per-frame deadlines, temporal smoothing); its stats also ride in the trailing
        metadata. A client that leaves closes the stream at once: waiting frames and the
        smoothing state are dropped, and its reader ends with the call."""

        def explain(received: Received, alive: Callable[[], bool]):
            request, image = received.message, received.image
            model = self.repository.get(request.model)
            with self.budget.admit(estimate(request, model.card, image)):
                return self.pipeline.explain(request, model, self.repository.runner(model),
                                             alive, image)

        def failed(exc: Exception, request_id: str) -> pb.Error:
            code = status_of(exc)
            self.metrics.requests.labels("ExplainStream", code.name).inc()
            self._log_failure(exc, code, request_id)
            return pb.Error(code=code.value[0], message=str(exc))

        stream = FrameStream(requests, explain, failed=failed, alive=context.is_active)
        context.add_callback(stream.close)
        try:
            for response in stream:
                if response.HasField("timings"):  # an explained frame
                    self._measured(response)
                    self.metrics.requests.labels("ExplainStream", "OK").inc()
                yield response
            context.set_trailing_metadata(((STATS_METADATA, stream.stats_json()),))
        except CamserveError as exc:  # the first request's StreamOptions were refused
            self._abort(context, exc, "")
        finally:
            stream.close()

    def _measured(self, response: pb.ExplainResponse) -> pb.ExplainResponse:
        t = response.timings
        self.metrics.observe_timings(t.decode_us, t.preprocess_us, t.inference_us,
                                     t.postprocess_us)
        return response

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext):
        repository = self.repository
        return pb.ListModelsResponse(models=[self.model_info(m) for _, m in
                                             sorted(repository.models.items())],
                                     default_model=repository.default)

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext):
        try:
            return self.model_info(self.repository.get(request.name))
        except Exception as exc:  # noqa: BLE001
            self._abort(context, exc, "")

    def ReloadModels(self, request: pb.ReloadModelsRequest, context: grpc.ServicerContext):
        try:
            loaded, refused = self.repository.reload()
        except CamserveError as exc:
            log.warning("reload refused, the old models stay: %s", exc)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{exc}; still serving: {', '.join(sorted(self.repository.models))}")
        except Exception as exc:  # noqa: BLE001
            self._abort(context, exc, "")
        return pb.ReloadModelsResponse(loaded=loaded, refused=refused)

    # --- the pipeline ---------------------------------------------------------------------
    def explain(self, request: pb.ExplainRequest, alive: Callable[[], bool] = lambda: True,
                image: memoryview | None = None) -> pb.ExplainResponse:
        """Answer one request; ``alive`` says whether its caller still waits (a request
        whose deadline passed or that was cancelled is dropped before the graph runs);
        ``image``: its image's bytes when they are not in the message (``Received``)."""
        model = self.repository.get(request.model)
        with self.budget.admit(estimate(request, model.card, image)):  # or RESOURCE_EXHAUSTED
            explained = self.pipeline.explain(request, model, self.repository.runner(model),
                                              alive, image)
            return to_response(explained, request)

    def model_info(self, model: ExplainerModel) -> pb.ModelInfo:
        card = model.card
        p = card.preprocessing
        return pb.ModelInfo(
            name=model.name, version=model.version, architecture=card.architecture,
            labels=card.labels, input_shape=[1, card.preprocessing.channels, *card.input_size],
            preprocessing=pb.Preprocessing(
                resize=p.resize, crop_height=p.crop[0], crop_width=p.crop[1], mean=p.mean,
                std=p.std, scale=p.scale, channel_order=p.channel_order,
                interpolation=p.interpolation, grayscale=p.grayscale),
            layers=[pb.LayerInfo(name=layer.name, shape=layer.shape) for layer in card.layers],
            methods=[m for m in methods.method_names() if m != "ablationcam" or model.head]
            + (list(attributions.METHODS) if model.saliency else []),
            contract_version=card.contract_version,
            execution_provider=model.provider, camserve_version=card.camserve_version,
            pixel_formats=frames.PIXEL_FORMATS)

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
