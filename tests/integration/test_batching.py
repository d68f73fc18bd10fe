"""Dynamic batching: concurrent requests share graph runs and get their own answers."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from camserve.client import Client
from camserve.server.app import start
from camserve.server.config import ServerConfig
from camserve.v1 import explainer_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def servers(models_dir):
    batched = start(ServerConfig(models=models_dir, port=0, device="cpu", default_model="tiny",
                                 max_batch_size=8, max_queue_delay_ms=200))
    single = start(ServerConfig(models=models_dir, port=0, device="cpu", default_model="tiny",
                                batching=False))
    yield batched, single
    batched.stop(grace=0)
    single.stop(grace=0)


def photos(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (40 + 3 * i, 70, 3), dtype=np.uint8) for i in range(count)]


def test_concurrent_requests_are_batched_and_answered_correctly(servers):
    batched, single = servers
    images = photos(8)
    targets = [[i % 10] if i % 2 else [i % 10, (i + 3) % 10] for i in range(8)]  # K of 1 and 2
    with Client(f"127.0.0.1:{single.port}", timeout=60) as client:
        expected = [client.explain(img, targets=t, top_k=1) for img, t in zip(images, targets)]
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def call(i: int) -> None:
        with Client(f"127.0.0.1:{batched.port}", timeout=60) as client:
            barrier.wait()
            results[i] = client.explain(images[i], targets=targets[i], top_k=1)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for got, want in zip(results, expected):
        assert [e.class_index for e in got] == [e.class_index for e in want]
        for g, w in zip(got, want):
            assert g.probability == pytest.approx(w.probability, rel=1e-4)
            np.testing.assert_allclose(g.cam_input, w.cam_input, atol=2e-3)
    sizes = batched.batchers["tiny"].batch_sizes
    assert max(sizes) > 1, sizes  # some requests really shared a run


def test_a_lone_request_does_not_wait_for_the_queue_delay(servers):
    batched, _ = servers
    with grpc.insecure_channel(f"127.0.0.1:{batched.port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        stub.Explain(Client.request(photos(1)[0]))  # warm
        response = stub.Explain(Client.request(photos(1)[0]))
    # the delay is 200 ms; a lone request must not sit it out
    assert response.timings.inference_us < 150_000


def test_bad_request_does_not_stall_the_batcher(servers):
    batched, _ = servers
    with Client(f"127.0.0.1:{batched.port}", timeout=60) as client:
        with pytest.raises(grpc.RpcError):
            client.explain(b"garbage")
        assert client.explain(photos(1)[0])
    assert batched.batchers["tiny"].pending == 0


def test_deadlines_under_load_release_their_slots(lite0_dir):
    running = start(ServerConfig(models=lite0_dir, port=0, device="cpu", max_batch_size=2,
                                 intra_op_threads=1))
    codes: list[str] = []
    lock = threading.Lock()
    photo = photos(1)[0]

    def hammer() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            for _ in range(6):
                try:
                    stub.Explain(Client.request(photo), timeout=0.05)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                with lock:
                    codes.append(code)

    try:
        threads = [threading.Thread(target=hammer) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(codes) == 36
        assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes
        assert "DEADLINE_EXCEEDED" in codes
        batcher = running.batchers["efficientnet_lite0"]
        for _ in range(100):  # the server finishes what it had started, then holds nothing
            if batcher.pending == 0:
                break
            threading.Event().wait(0.05)
        assert batcher.pending == 0
        with Client(f"127.0.0.1:{running.port}", timeout=30) as client:
            assert client.explain(photo)  # and still serves
    finally:
        running.stop(grace=0)
