"""Build and run the gRPC server: Explainer, grpc.health.v1 and server reflection."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from camserve.errors import CamserveError
from camserve.server.batching import Batcher
from camserve.server.models import ExplainerModel, load_models
from camserve.server.service import ExplainerService, Limits
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

log = logging.getLogger("camserve.server")

EXPLAINER_SERVICE = pb.DESCRIPTOR.services_by_name["Explainer"].full_name


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


class RunningServer:
    """A started server: its bound port, health servicer and models; ``stop`` ends it."""

    def __init__(self, server: grpc.Server, port: int, health_servicer: health.HealthServicer,
                 models: dict[str, ExplainerModel], batchers: dict[str, Batcher]) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.models = models
        self.batchers = batchers

    def stop(self, grace: float | None = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for batcher in self.batchers.values():
            batcher.close()


def start(config: ServerConfig) -> RunningServer:
    """Load and warm up every model, then serve; health is SERVING only after warm-up."""
    models = load_models(config.models, config.device, config.intra_op_threads)
    if config.default_model and config.default_model not in models:
        raise CamserveError(f"--default-model {config.default_model!r} is not among the loaded "
                            f"models: {', '.join(sorted(models))}")
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                         options=options)
    batchers = {name: Batcher(model, config.max_batch_size, config.max_queue_delay_ms / 1e3)
                for name, model in models.items()} if config.batching else {}
    pb_grpc.add_ExplainerServicer_to_server(
        ExplainerService(models, config.default_model, Limits(), batchers), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (EXPLAINER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    server.start()
    for name in [""] + list(models):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(EXPLAINER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %d model(s) on %s:%d", len(models), config.host, port)
    return RunningServer(server, port, health_servicer, models, batchers)


def serve_forever(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    running = start(config)
    print(f"camserve listening on {config.host}:{running.port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down")
    running.stop()
