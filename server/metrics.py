"""Prometheus metrics: requests by RPC and status, stage latencies, batch sizes, queue depth
and requests in flight. Each server owns its registry, so several can share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
STAGES = ("decode", "preprocess", "inference", "postprocess")


class Metrics:
    """The server's instruments; ``serve(port)`` exposes them over HTTP for scraping."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("camserve_requests", "RPCs answered, by RPC and status code",
                                ["rpc", "code"], registry=self.registry)
        self.stage_seconds = Histogram("camserve_stage_seconds", "time per request stage",
                                       ["stage"], buckets=_LATENCY_BUCKETS,
                                       registry=self.registry)
        self.batch_size = Histogram("camserve_batch_size", "requests per graph run",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=self.registry)
        self.queue_depth = Gauge("camserve_queue_depth", "requests waiting for a batch",
                                 ["model"], registry=self.registry)
        self.in_flight = Gauge("camserve_in_flight", "requests being answered",
                               registry=self.registry)

    def observe_timings(self, decode_us: int, preprocess_us: int, inference_us: int,
                        postprocess_us: int) -> None:
        for stage, micros in zip(STAGES, (decode_us, preprocess_us, inference_us,
                                          postprocess_us)):
            self.stage_seconds.labels(stage).observe(micros / 1e6)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter; returns the bound port. A busy port is an OSError
        (EADDRINUSE: the exporter sets no SO_REUSEPORT), which ``camserve.server.app``
        reports as a one-line ``PortError``."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
