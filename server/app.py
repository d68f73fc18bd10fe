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
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from camserve.errors import CamserveError, OperatorError
from camserve.explain.pipeline import Limits
from camserve.server.batching import Batcher
from camserve.server.config import ServerConfig
from camserve.server.lifecycle import Gate
from camserve.server.metrics import Metrics
from camserve.server.repository import SERVING, ModelRepository
from camserve.server.runtime import ExplainerModel
from camserve.server.security import (
    MalformedMessageInterceptor,
    TokenAuthInterceptor,
    read_token,
    server_credentials,
)
from camserve.server.service import ExplainerService
from camserve.server.wire import ZeroCopyImageInterceptor
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

log = logging.getLogger("camserve.server")

EXPLAINER_SERVICE = pb.DESCRIPTOR.services_by_name["Explainer"].full_name


class PortError(OperatorError, OSError):
    """A port the server was asked to listen on cannot be bound."""


class RunningServer:
    """A started server: its bound port, health servicer, model repository and service;
    ``reload`` swaps in the models folder's current content, ``stop`` ends it."""

    def __init__(self, server: grpc.Server, port: int, health_servicer: health.HealthServicer,
                 service: ExplainerService, config: ServerConfig, gate: Gate) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.service = service
        self.repository = service.repository
        self.config = config
        self._gate = gate
        self.metrics_port: int | None = None  # set when the Prometheus exporter runs
        self.health_port: int | None = None  # set when the health-only server runs
        self.health_server: grpc.Server | None = None

    @property
    def models(self) -> dict[str, ExplainerModel]:
        return self.repository.models

    @property
    def batchers(self) -> dict[str, Batcher]:
        return self.repository.batchers

    @property
    def in_flight(self) -> int:
        """Calls (other than health and reflection) running now."""
        return self._gate.in_flight

    def reload(self) -> tuple[list[str], list[str]]:
        """``ModelRepository.reload``: (loaded, refused)."""
        return self.repository.reload()

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

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING; after the config's ``drain_seconds`` (calls still taken, so a
        load balancer takes the server out first) new calls UNAVAILABLE; calls in flight get
        ``grace`` seconds (default: the config's) to finish, then are cancelled; then the
        batchers close."""
        grace = self.config.grace_seconds if grace is None else max(0.0, grace)
        self.repository.refuse_reloads()
        self.health.enter_graceful_shutdown()
        self._gate.drain(self.config.drain_seconds)
        deadline = time.monotonic() + grace
        self._gate.close()
        if not self._gate.wait_settled(grace):
            log.warning("stopping with %d call(s) still in flight", self._gate.in_flight)
            deadline = time.monotonic()
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        self.repository.close()
        if self.health_server is not None:  # NOT_SERVING on it until the very end
            self.health_server.stop(None).wait()

    def hurry(self) -> None:
        """Make a ``stop`` in progress cancel the calls still in flight now."""
        self._gate.hurry()


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
        raise OperatorError("--grace-seconds must be >= 0")
    if config.workers < 1 or config.max_queue < 0:
        raise OperatorError("--workers must be >= 1 and --max-queue >= 0")
    if (config.max_connection_age or 0) < 0 or (config.max_connection_age_grace or 0) < 0:
        raise OperatorError("--max-connection-age and --max-connection-age-grace must be >= 0")
    gate = Gate()
    health_servicer = health.HealthServicer()
    metrics = Metrics()
    repository = ModelRepository.load(config, metrics, health_servicer)
    try:
        running = _listen(config, repository, gate, health_servicer, credentials, token)
    except BaseException:
        repository.close()  # nothing is served: its batchers refuse from now on
        raise
    running.server.start()
    repository.announce()
    health_servicer.set(EXPLAINER_SERVICE, SERVING)
    log.info("serving %d model(s) on %s:%d (%s%s)", len(repository.models), config.host,
             running.port,
             "mutual TLS" if config.tls_client_ca else "TLS" if credentials else "plaintext",
             ", bearer token required" if token else "")
    return running


def connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's max_connection_age(_grace) from the config (none when the age is off)."""
    if not config.max_connection_age:
        return []
    options = [("grpc.max_connection_age_ms", round(config.max_connection_age * 1000))]
    if config.max_connection_age_grace is not None:
        options.append(("grpc.max_connection_age_grace_ms",
                        round(config.max_connection_age_grace * 1000)))
    return options


def _listen(config: ServerConfig, repository: ModelRepository, gate: Gate,
            health_servicer: health.HealthServicer,
            credentials: grpc.ServerCredentials | None, token: str | None) -> RunningServer:
    """The gRPC server with its services, bound to its port (and the health-only and
    metrics ports when asked), not started yet."""
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               # accept the SDK's keepalive pings (every 30 s) on a quiet long call
               ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
               # Linux gRPC sets SO_REUSEPORT: a second server would silently share the port
               ("grpc.so_reuseport", 0)]
    options += connection_age_options(config)
    # MalformedMessageInterceptor wraps the parser that ZeroCopyImageInterceptor puts in
    interceptors = [gate] + ([TokenAuthInterceptor(token)] if token else []) + [
        MalformedMessageInterceptor(), ZeroCopyImageInterceptor()]
    # gRPC answers RESOURCE_EXHAUSTED at once to calls beyond workers + queue
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                         options=options, interceptors=interceptors,
                         maximum_concurrent_rpcs=config.workers + config.max_queue)
    service = ExplainerService(repository, Limits())
    pb_grpc.add_ExplainerServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(server)
    address = f"{config.host}:{config.port}"
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        port, reason = 0, f" ({exc})"
    else:
        reason = ""
    if port == 0:
        raise PortError(f"cannot bind {address}{reason}: is another server using the port?")
    running = RunningServer(server, port, health_servicer, service, config, gate)
    try:
        _listen_aside(running, repository, config)
    except BaseException:
        # a failed start releases what it bound: the next try may use the same ports. gRPC
        # frees a bound port only when a started server stops; the closed gate refuses any
        # call in between
        if running.health_server is not None:
            running.health_server.stop(None).wait()
        gate.close()
        server.start()
        server.stop(None).wait()
        raise
    return running


def _listen_aside(running: RunningServer, repository: ModelRepository,
                  config: ServerConfig) -> None:
    """The health-only server and the metrics exporter, when the config asks for them."""
    if config.health_port is not None:
        running.health_server, running.health_port = _health_server(
            running.health, config.host, config.health_port)
        log.info("health only on %s:%d (plaintext)", config.host, running.health_port)
    if config.metrics_port is not None:
        try:
            running.metrics_port = repository.metrics.serve(config.metrics_port, config.host)
        except OSError as exc:
            raise PortError(f"cannot bind the metrics port {config.host}:"
                            f"{config.metrics_port} ({exc.strerror or exc}): is another "
                            "server using the port?") from None
        log.info("metrics on http://%s:%d/metrics", config.host, running.metrics_port)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.Server) -> None:
    """Server reflection under both names: grpc.reflection.v1 (what grpcurl and current
    tools ask first) and v1alpha. The installed grpcio-reflection ships v1alpha only; v1 is
    the same protocol under a new package (identical messages and field numbers), so the
    same servicer answers it."""
    names = (EXPLAINER_SERVICE, health.SERVICE_NAME, REFLECTION_V1, reflection.SERVICE_NAME)
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1, {"ServerReflectionInfo": info}),))


HEALTH_WORKERS = 2  # health checks are answered from memory; two threads keep up


def _health_server(servicer: health.HealthServicer, host: str,
                   port: int) -> tuple[grpc.Server, int]:
    """A second gRPC server answering grpc.health.v1's Check only, with threads and no call
    limit of its own (the main server's limit refuses health checks when it is
    saturated)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS,
                                                    thread_name_prefix="health"),
                         options=[("grpc.so_reuseport", 0)],  # the port is ours alone
                         interceptors=[MalformedMessageInterceptor()])
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
