"""Prometheus metrics and overload: the exporter counts what happened, and calls beyond
the workers and the queue are refused at once."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from camserve.client import Client
from camserve.server.app import start
from camserve.server.config import ServerConfig
from camserve.v1 import explainer_pb2_grpc as pb_grpc


def test_metrics_count_requests_stages_and_batches(models_dir):
    running = start(ServerConfig(models=models_dir, port=0, device="cpu", metrics_port=0,
                                 default_model="tiny"))
    try:
        with Client(f"127.0.0.1:{running.port}") as client:
            for _ in range(3):
                client.explain(np.zeros((20, 30, 3), np.uint8))
            with pytest.raises(grpc.RpcError):
                client.explain(b"junk")
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        running.stop(grace=0)
    assert 'camserve_requests_total{code="OK",rpc="Explain"} 3.0' in text
    assert 'camserve_requests_total{code="INVALID_ARGUMENT",rpc="Explain"} 1.0' in text
    assert 'camserve_stage_seconds_count{stage="inference"} 3.0' in text
    assert 'camserve_batch_size_count{model="tiny"} 3.0' in text
    assert "camserve_in_flight 0.0" in text


def test_calls_beyond_workers_and_queue_are_refused_at_once(lite0_dir):
    running = start(ServerConfig(models=lite0_dir, port=0, device="cpu", workers=1,
                                 max_queue=0, intra_op_threads=1))
    codes: list[tuple[str, float]] = []
    lock = threading.Lock()
    photo = np.zeros((224, 224, 3), np.uint8)
    barrier = threading.Barrier(6)

    def call() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            barrier.wait()
            started = time.monotonic()
            try:
                stub.Explain(Client.request(photo, noise_samples=32), timeout=120)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            with lock:
                codes.append((code, time.monotonic() - started))

    try:
        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        running.stop(grace=0)
    refused = [seconds for code, seconds in codes if code == "RESOURCE_EXHAUSTED"]
    assert len(codes) == 6 and "OK" in [c for c, _ in codes]
    assert refused and max(refused) < 1.0  # refused at once, not after a timeout
    assert {c for c, _ in codes} <= {"OK", "RESOURCE_EXHAUSTED"}
