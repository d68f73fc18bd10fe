"""Mixed load on a server process: 1,000 requests from 16 concurrent clients, 10% of them
malformed. Good requests get correct answers, bad ones the right status, and the server's
memory does not grow."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import numpy as np
import psutil
import pytest

from camserve.client import Client
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

CLIENTS = 16
REQUESTS = 1000


@pytest.fixture(scope="module")
def server_process(models_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "camserve", "serve", "--models", str(models_dir), "--port",
         str(port), "--device", "cpu", "--intra-op-threads", "1", "--default-model", "tiny"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    with Client(f"127.0.0.1:{port}", timeout=1) as client:
        assert client.wait_until_serving(60, lambda: process.poll() is None), "no server"
    yield port, psutil.Process(process.pid)
    process.terminate()
    process.wait(timeout=30)


def requests(count: int):
    """(request, expected status) pairs: every tenth is malformed, in rotating ways."""
    rng = np.random.default_rng(5)
    photos = [cv2.imencode(".png", rng.integers(0, 256, (30 + i, 50, 3), dtype=np.uint8))[1]
              .tobytes() for i in range(8)]
    bad = [(pb.ExplainRequest(encoded=b"junk"), "INVALID_ARGUMENT"),
           (pb.ExplainRequest(encoded=photos[0], classes=[10]), "INVALID_ARGUMENT"),
           (pb.ExplainRequest(encoded=photos[0], model="nope"), "NOT_FOUND"),
           (pb.ExplainRequest(encoded=photos[0], method="magic"), "INVALID_ARGUMENT"),
           (pb.ExplainRequest(encoded=photos[0], classes=[1] * 100), "RESOURCE_EXHAUSTED")]
    for i in range(count):
        if i % 10 == 9:
            yield bad[(i // 10) % len(bad)]
        else:
            yield pb.ExplainRequest(encoded=photos[i % 8], classes=[i % 10],
                                    request_id=str(i)), "OK"


def _map(response: pb.ExplainResponse) -> np.ndarray:
    return np.frombuffer(response.targets[0].cam.data, np.float32)


def test_mixed_load_keeps_answers_right_and_memory_flat(server_process):
    port, process = server_process
    work = list(requests(REQUESTS))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        expected = {i: stub.Explain(work[i][0]) for i in range(8)}  # reference answers

    def call(pair):
        request, code = pair
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                response = pb_grpc.ExplainerStub(channel).Explain(request, timeout=60)
                return code, "OK", request, response
            except grpc.RpcError as err:
                return code, err.code().name, request, None

    # warm-up at the load's concurrency: every thread that will run the graph (a batch is led
    # by one of the calls' threads) holds its per-thread buffers before the baseline
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(call, work[:200]))
    warm_rss = process.memory_info().rss

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(call, work))
    assert [got for _, got, _, _ in results] == [want for want, _, _, _ in results]
    for _, _, request, response in results:
        if response is None:
            continue
        assert response.request_id == request.request_id
        assert response.targets[0].class_index == request.classes[0]
        reference = expected.get(int(request.request_id) % 8)
        if reference is not None and reference.targets[0].class_index == request.classes[0]:
            np.testing.assert_allclose(_map(response), _map(reference), atol=1e-5)
    rss = process.memory_info().rss
    assert rss <= warm_rss * 1.10, f"RSS grew from {warm_rss >> 20} to {rss >> 20} MiB"
