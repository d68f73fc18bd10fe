"""Build and run the gRPC server: Explainer, grpc.health.v1 and server reflection.

Lifecycle: ``start`` loads and warms up every model before health says SERVING.
``RunningServer.stop`` (SIGTERM, SIGINT) flips health to NOT_SERVING, refuses new calls with
UNAVAILABLE, lets the calls in flight finish within the grace period and then closes the
batchers. ``RunningServer.reload`` (the ReloadModels RPC, SIGHUP) loads the models folder
again and swaps the new set in; calls in flight finish on the models they started with.

Health is also served on the main port, where it shares the worker threads and the
``workers + max_queue`` call limit with Explain: a saturated server refuses health checks
there (RESOURCE_EXHAUSTED), and a proxy or orchestrator would take every saturated replica
out at once. ``health_port`` serves grpc.health.v1 alone on a second, plaintext port with
threads of its own, so probes pointed there see the true status under any load.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import signal
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from camserve.errors import CamserveError
from camserve.server.batching import Batcher
from camserve.server.metrics import Metrics
from camserve.server.models import ExplainerModel, load_models
from camserve.server.security import (
    TokenAuthInterceptor,
    is_open,
    read_token,
    refusal,
    server_credentials,
)
from camserve.server.pipeline import Limits
from camserve.server.service import ExplainerService
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

log = logging.getLogger("camserve.server")

EXPLAINER_SERVICE = pb.DESCRIPTOR.services_by_name["Explainer"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerConfig:
    models: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    intra_op_threads: int | None = None
    workers: int = 16
    max_message_bytes: int = 16 * 1024 * 1024
    default_model: str | None = None
    batching: bool = True  # dynamic batching of concurrent requests per model
    max_batch_size: int = 8
    max_queue_delay_ms: float = 2.0
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key: serve TLS only
    tls_key: Path | None = None  # PEM private key
    tls_client_ca: Path | None = None  # PEM CA: clients must show a certificate it signed
    auth_token_file: Path | None = None  # one bearer token every call but health must carry
    grace_seconds: float = 10.0  # on stop: how long calls in flight may take to finish
    max_queue: int = 64  # calls waiting for a worker; beyond: RESOURCE_EXHAUSTED at once
    metrics_port: int | None = None  # Prometheus exporter on host:port (0: any free port)
    health_port: int | None = None  # grpc.health.v1 alone, plaintext (0: any free port)


class PortError(CamserveError, OSError):
    """A port the server was asked to listen on cannot be bound."""


SETTLE_SECONDS = 0.1  # on stop: quiet time that proves no admitted call is still queued


class _Gate(grpc.ServerInterceptor):
    """Counts the calls in flight (per model generation) and, once closed, answers new ones
    UNAVAILABLE. Health and reflection pass untouched, so probes see NOT_SERVING."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._hurry = False
        self._generation = 0
        self._active: Counter[int] = Counter()  # generation -> calls in flight
        self._started = 0  # calls that reached a worker, ever

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or is_open(handler_call_details.method):
            return handler
        with self._cond:
            refuse = not self._open
        if refuse:
            return refusal(handler, grpc.StatusCode.UNAVAILABLE,
                           "the server is shutting down; retry with another replica")
        return self._counted(handler)

    def _enter(self) -> int:
        with self._cond:
            self._started += 1
            self._active[self._generation] += 1
            return self._generation

    def _leave(self, generation: int) -> None:
        with self._cond:
            self._active[generation] -= 1
            if not self._active[generation]:
                del self._active[generation]
            self._cond.notify_all()

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            def behavior(request, context):
                generation = self._enter()
                try:
                    yield from inner(request, context)
                finally:
                    self._leave(generation)
        else:
            inner = handler.unary_unary or handler.stream_unary

            def behavior(request, context):
                generation = self._enter()
                try:
                    return inner(request, context)
                finally:
                    self._leave(generation)

        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(behavior, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return sum(self._active.values())

    def close(self) -> None:
        """Refuse every new call from now on."""
        with self._cond:
            self._open = False

    def hurry(self) -> None:
        """Stop waiting for calls in flight (a second stop signal)."""
        with self._cond:
            self._hurry = True
            self._cond.notify_all()

    def advance(self) -> int:
        """Start a new generation (after a model swap); returns the last old one."""
        with self._cond:
            self._generation += 1
            return self._generation - 1

    def wait_idle(self, timeout: float, upto: int | None = None) -> bool:
        """Wait until no call (of generation ``upto`` or older) is in flight; False when
        ``timeout`` seconds passed first or ``hurry`` was called."""
        def idle() -> bool:
            return self._hurry or not any(n for g, n in self._active.items()
                                          if upto is None or g <= upto)
        with self._cond:
            return self._cond.wait_for(idle, timeout) and not self._hurry

    def wait_settled(self, timeout: float, settle: float = SETTLE_SECONDS) -> bool:
        """``wait_idle``, and then idle for ``settle`` seconds on end: a call that passed the
        gate before it closed but still waited for a worker thread is not counted yet, and
        stopping the gRPC server under it would cancel it (CANCELLED). False as for
        ``wait_idle``."""
        deadline = time.monotonic() + timeout
        while self.wait_idle(max(0.0, deadline - time.monotonic())):
            with self._cond:
                started = self._started
            time.sleep(max(0.0, min(settle, deadline - time.monotonic())))
            with self._cond:
                if self._started == started:
                    return True
        return False


class RunningServer:
    """A started server: its bound port, health servicer and service; ``reload`` swaps in the
    models folder's current content, ``stop`` ends it."""

    def __init__(self, server: grpc.Server, port: int, health_servicer: health.HealthServicer,
                 service: ExplainerService, config: ServerConfig, gate: _Gate) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.service = service
        self.config = config
        self._gate = gate
        self.metrics_port: int | None = None  # set when the Prometheus exporter runs
        self.health_port: int | None = None  # set when the health-only server runs
        self.health_server: grpc.Server | None = None
        self._reload_lock = threading.Lock()  # one reload at a time
        self._state_lock = threading.Lock()  # swap vs stop
        self._stopping = False
        self._retiring: list[Batcher] = []  # replaced batchers not closed yet
        service.reloader = self.reload

    @property
    def models(self) -> dict[str, ExplainerModel]:
        return self.service.models

    @property
    def batchers(self) -> dict[str, Batcher]:
        return self.service.batchers

    @property
    def in_flight(self) -> int:
        """Calls (other than health and reflection) running now."""
        return self._gate.in_flight

    # --- reload -----------------------------------------------------------------------------
    def reload(self) -> pb.ReloadModelsResponse:
        """Load the models folder again (validated and warmed up) and swap the new set in.

        Raises CamserveError, keeping the old set, when the folder holds no usable model.
        The replaced batchers close once the calls that started before the swap are done.
        """
        with self._reload_lock:
            config = self.config
            if self._stopping:
                raise CamserveError("the server is shutting down")
            log.info("reloading models from %s", config.models)
            refused: list[str] = []
            models = load_models(config.models, config.device, config.intra_op_threads,
                                 refused)
            default = config.default_model
            if default and default not in models:
                log.warning("--default-model %r is not in the reloaded folder; the default is "
                            "now %r", default, sorted(models)[0])
                default = None
            batchers = _batchers(models, config, self.service.metrics)
            with self._state_lock:
                if self._stopping:
                    for batcher in batchers.values():
                        batcher.close()
                    raise CamserveError("the server is shutting down")
                before = set(self.service.models)
                old = list(self.service.swap(models, default, batchers).values())
                last_old = self._gate.advance()
                self._retiring += old
            for name in models:
                self.health.set(name, SERVING)
            for name in before - set(models):
                self.health.set(name, NOT_SERVING)
            if old:
                threading.Thread(target=self._retire, args=(old, last_old), daemon=True,
                                 name="retire-batchers").start()
            log.info("reloaded: serving %s%s", ", ".join(sorted(models)),
                     f"; refused {len(refused)} file(s)" if refused else "")
            return pb.ReloadModelsResponse(loaded=sorted(models), refused=refused)

    def reload_in_background(self) -> None:
        """``reload`` on a thread of its own, logging the outcome (for SIGHUP)."""
        def run() -> None:
            try:
                self.reload()
            except CamserveError as exc:
                log.error("reload failed, the old models stay: %s", exc)
            except Exception:  # noqa: BLE001 -- the server goes on with the old models
                log.exception("reload failed, the old models stay")
        threading.Thread(target=run, daemon=True, name="reload").start()

    def _retire(self, batchers: list[Batcher], generation: int) -> None:
        """Close replaced batchers once the calls that may hold them are done (a stream
        open longer than the grace period no longer delays it)."""
        self._gate.wait_idle(max(self.config.grace_seconds, 1.0), upto=generation)
        deadline = time.monotonic() + 5.0
        while any(b.pending for b in batchers) and time.monotonic() < deadline:
            time.sleep(0.01)
        for batcher in batchers:
            batcher.close()
        with self._state_lock:
            self._retiring = [b for b in self._retiring if b not in batchers]

    # --- stop -------------------------------------------------------------------------------
    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, new calls UNAVAILABLE; calls in flight get ``grace`` seconds
        (default: the config's) to finish, then are cancelled; then the batchers close."""
        grace = self.config.grace_seconds if grace is None else max(0.0, grace)
        deadline = time.monotonic() + grace
        with self._state_lock:
            self._stopping = True
        self.health.enter_graceful_shutdown()
        self._gate.close()
        if not self._gate.wait_settled(grace):
            log.warning("stopping with %d call(s) still in flight", self._gate.in_flight)
            deadline = time.monotonic()
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        with self._state_lock:
            batchers = list(self.service.batchers.values()) + self._retiring
        for batcher in batchers:
            batcher.close()
        if self.health_server is not None:  # NOT_SERVING on it until the very end
            self.health_server.stop(None).wait()

    def hurry(self) -> None:
        """Make a ``stop`` in progress cancel the calls still in flight now."""
        self._gate.hurry()


def _batchers(models: dict[str, ExplainerModel], config: ServerConfig,
              metrics: Metrics) -> dict[str, Batcher]:
    if not config.batching:
        return {}
    return {name: Batcher(model, config.max_batch_size, config.max_queue_delay_ms / 1e3,
                          metrics)
            for name, model in models.items()}


def _is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _security(config: ServerConfig) -> tuple[grpc.ServerCredentials | None, str | None]:
    """TLS credentials and the bearer token the config asks for, read before any model
    loads, so that a mistake there is a quick, clear startup error."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise CamserveError("TLS needs both --tls-cert and --tls-key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise CamserveError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    credentials = None
    if config.tls_cert is not None:
        credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    token = read_token(config.auth_token_file) if config.auth_token_file is not None else None
    if not _is_loopback(config.host):
        if credentials is None:
            log.warning("serving plaintext on %s: anyone on the network can call it%s; use "
                        "--tls-cert/--tls-key", config.host,
                        " and read the bearer token" if token else "")
        if token is None and config.tls_client_ca is None:
            log.warning("no authentication on %s: use --auth-token-file or --tls-client-ca",
                        config.host)
    return credentials, token


def start(config: ServerConfig) -> RunningServer:
    """Load and warm up every model, then serve; health is SERVING only after warm-up."""
    credentials, token = _security(config)
    if config.grace_seconds < 0:
        raise CamserveError("--grace-seconds must be >= 0")
    models = load_models(config.models, config.device, config.intra_op_threads)
    if config.default_model and config.default_model not in models:
        raise CamserveError(f"--default-model {config.default_model!r} is not among the loaded "
                            f"models: {', '.join(sorted(models))}")
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               # accept the SDK's keepalive pings (every 30 s) on a quiet long call
               ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]
    gate = _Gate()
    interceptors = [gate] + ([TokenAuthInterceptor(token)] if token else [])
    if config.workers < 1 or config.max_queue < 0:
        raise CamserveError("--workers must be >= 1 and --max-queue >= 0")
    # gRPC answers RESOURCE_EXHAUSTED at once to calls beyond workers + queue
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                         options=options, interceptors=interceptors,
                         maximum_concurrent_rpcs=config.workers + config.max_queue)
    metrics = Metrics()
    batchers = _batchers(models, config, metrics)
    service = ExplainerService(models, config.default_model, Limits(), batchers, metrics)
    pb_grpc.add_ExplainerServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (EXPLAINER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        port, reason = 0, f" ({exc})"
    else:
        reason = ""
    if port == 0:
        for batcher in batchers.values():
            batcher.close()
        raise PortError(f"cannot bind {address}{reason}: is another server using the port?")
    running = RunningServer(server, port, health_servicer, service, config, gate)
    if config.health_port is not None:
        try:
            running.health_server, running.health_port = _health_server(
                health_servicer, config.host, config.health_port)
        except OSError:
            for batcher in batchers.values():
                batcher.close()
            raise
        log.info("health only on %s:%d (plaintext)", config.host, running.health_port)
    if config.metrics_port is not None:
        running.metrics_port = metrics.serve(config.metrics_port, config.host)
        log.info("metrics on http://%s:%d/metrics", config.host, running.metrics_port)
    server.start()
    for name in [""] + list(models):
        health_servicer.set(name, SERVING)
    health_servicer.set(EXPLAINER_SERVICE, SERVING)
    log.info("serving %d model(s) on %s:%d (%s%s)", len(models), config.host, port,
             "mutual TLS" if config.tls_client_ca else "TLS" if credentials else "plaintext",
             ", bearer token required" if token else "")
    return running


HEALTH_WORKERS = 2  # health checks are answered from memory; two threads keep up


def _health_server(servicer: health.HealthServicer, host: str,
                   port: int) -> tuple[grpc.Server, int]:
    """A second gRPC server answering grpc.health.v1's Check only, with threads and no call
    limit of its own (the main server's limit refuses health checks when it is
    saturated)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS,
                                                    thread_name_prefix="health"))
    # Check only: a Watch stream would hold one of the few threads for as long as it lasts
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        health.SERVICE_NAME, {"Check": check}),))
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise PortError(f"cannot bind the health port {address} ({exc})") from None
    if bound == 0:
        raise PortError(f"cannot bind the health port {address}: is another server using "
                        "the port?")
    server.start()
    return server, bound


def serve_forever(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully; SIGHUP reloads the models."""
    running = start(config)
    if running.health_port is not None:
        print(f"camserve health on {config.host}:{running.health_port}", flush=True)
    print(f"camserve listening on {config.host}:{running.port}", flush=True)
    received: queue.SimpleQueue[int] = queue.SimpleQueue()
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stopping.is_set() and signum != signal.SIGHUP:
            running.hurry()  # a second stop signal: cancel what is still running
        received.put(signum)

    handled = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        handled.append(signal.SIGHUP)
    for sig in handled:
        signal.signal(sig, on_signal)
    while True:
        try:
            signum = received.get(timeout=1.0)
        except queue.Empty:
            continue
        if signum == getattr(signal, "SIGHUP", None):
            log.info("SIGHUP: reloading models")
            running.reload_in_background()
            continue
        break
    stopping.set()
    log.info("%s: shutting down; calls in flight get up to %g s to finish (send it again to "
             "cancel them)", signal.Signals(signum).name, config.grace_seconds)
    running.stop()
    log.info("stopped")
