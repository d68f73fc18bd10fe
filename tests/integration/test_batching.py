"""Dynamic batching: concurrent requests share graph runs and get their own answers."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from camserve.client import Client
from camserve.errors import CamserveError
from camserve.server.app import start
from camserve.server.batching import Batcher
from camserve.server.config import ServerConfig
from camserve.server.runtime import load_model
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


@pytest.fixture(scope="module")
def lite0_servers(lite0_dir):
    """Lite0 with and without batching: its graph run (~10 ms) outlasts the arrival of a
    burst, so the requests that arrive during the first run share the next."""
    batched = start(ServerConfig(models=lite0_dir, port=0, device="cpu", max_batch_size=8,
                                 max_queue_delay_ms=200, intra_op_threads=1))
    single = start(ServerConfig(models=lite0_dir, port=0, device="cpu", batching=False,
                                intra_op_threads=1))
    yield batched, single
    batched.stop(grace=0)
    single.stop(grace=0)


def test_concurrent_requests_are_batched_and_answered_correctly(lite0_servers):
    batched, single = lite0_servers
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
    sizes = batched.batchers["efficientnet_lite0"].batch_sizes
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


class RecordingModel:
    """The real tiny explainer, with the thread and batch size of every graph run recorded
    (and a run made to fail on request) -- what ``Batcher`` needs of a model: name and run."""

    def __init__(self, model) -> None:
        self.model = model
        self.name = model.name
        self.runs: list[tuple[int, int]] = []  # (thread ident, batch size)
        self.fail_next = False

    def run(self, image, targets, layers):
        self.runs.append((threading.get_ident(), len(image)))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the graph run failed")
        return self.model.run(image, targets, layers)


@pytest.fixture(scope="module")
def tiny2(models_dir):
    return load_model(models_dir / "tiny2.onnx", device="cpu", threads=1)


def inputs(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(count)]


def run_together(batcher: Batcher, jobs: list[tuple[np.ndarray, list[str]]]) -> list:
    """Each (image, layers) from its own thread, all expected before any submits (as
    requests being prepared at once); returns each result or the exception it raised."""
    results: list = [None] * len(jobs)
    for _ in jobs:
        batcher.expect()

    def call(i: int) -> None:
        image, layers = jobs[i]
        try:
            results[i] = batcher.run(image, np.array([i % 10]), layers)
        except Exception as exc:  # noqa: BLE001 -- the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_a_lone_request_runs_on_its_own_thread_at_once(tiny2):
    model = RecordingModel(tiny2)
    batcher = Batcher(model, max_batch_size=8, max_queue_delay=5.0)
    image = inputs(1)[0]
    batcher.expect()
    started = time.monotonic()
    logits, classes, per_layer = batcher.run(image, np.array([3]), ["features.6"])
    assert time.monotonic() - started < 2.5  # not the 5 s queue delay
    assert model.runs == [(threading.get_ident(), 1)]  # no hand-off to another thread
    want = tiny2.run(image, np.array([[3]]), ["features.6"])
    np.testing.assert_array_equal(logits, want[0])
    np.testing.assert_array_equal(per_layer["features.6"][1], want[2]["features.6"][1])
    assert batcher.pending == 0


def test_jobs_for_other_layers_are_led_in_turn_and_answered_exactly(tiny2):
    model = RecordingModel(tiny2)
    batcher = Batcher(model, max_batch_size=4, max_queue_delay=0.5)
    layers = [["features.2"], ["features.6"], ["features.2", "features.6"]]
    jobs = [(image, layers[i % 3]) for i, image in enumerate(inputs(12))]
    results = run_together(batcher, jobs)
    for i, ((image, wanted), got) in enumerate(zip(jobs, results)):
        want = tiny2.run(image, np.array([[i % 10]]), wanted)
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
        assert sorted(got[2]) == sorted(wanted)
        for name in wanted:
            for mine, theirs in zip(got[2][name], want[2][name]):
                np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert sum(size for _, size in model.runs) == 12
    assert max(size for _, size in model.runs) > 1  # batches formed
    assert len({ident for ident, _ in model.runs}) > 1  # led by the callers in turn
    assert batcher.pending == 0


def test_a_failed_run_fails_its_whole_batch_and_the_next_requests_still_run(tiny2):
    model = RecordingModel(tiny2)
    batcher = Batcher(model, max_batch_size=8, max_queue_delay=1.0)
    model.fail_next = True
    results = run_together(batcher, [(image, ["features.6"]) for image in inputs(4)])
    failed = sum(isinstance(r, RuntimeError) for r in results)
    assert failed == model.runs[0][1]  # exactly the first batch failed, the rest ran
    assert all(isinstance(r, (RuntimeError, tuple)) for r in results), results
    results = run_together(batcher, [(image, ["features.6"]) for image in inputs(3)])
    assert all(not isinstance(r, Exception) for r in results), results
    assert batcher.pending == 0


def test_a_closed_batcher_refuses_new_jobs(tiny2):
    batcher = Batcher(RecordingModel(tiny2))
    batcher.close()
    batcher.expect()
    with pytest.raises(CamserveError, match="shutting down"):
        batcher.run(inputs(1)[0], np.array([1]), ["features.6"])
    assert batcher.pending == 0
