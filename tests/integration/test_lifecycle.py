"""Lifecycle: graceful stop on SIGTERM (calls in flight finish, new ones are refused,
health says NOT_SERVING, exit code 0) and model reloads (ReloadModels, SIGHUP) that leave
calls in flight alone."""

from __future__ import annotations

import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_process import ServeProcess

from camserve.client import Client
from camserve.server.app import start
from camserve.server.config import ServerConfig
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

IMAGE = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
SLOW = 20  # smoothing copies: with BIG, a call of ~0.1-0.5 s on the tiny model


def _big_jpeg() -> bytes:
    """A 1600x1200 JPEG: a call spends most of its time decoding, after it took its model's
    batcher and before it queues there."""
    big = cv2.resize(IMAGE, (1600, 1200), interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(".jpg", big)[1].tobytes()


BIG = _big_jpeg()
CALL_S = 20
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def folder(tmp_path, models_dir) -> Path:
    """A private copy of the tests' models folder (tiny.onnx, tiny2.onnx) to add to and
    remove from."""
    return Path(shutil.copytree(models_dir, tmp_path / "models"))


@pytest.fixture
def spawn(tmp_path):
    started: list[ServeProcess] = []

    def make(folder: Path, *flags: str) -> ServeProcess:
        started.append(ServeProcess(folder, tmp_path / f"server{len(started)}.log", *flags))
        return started[-1]
    yield make
    for server in started:
        server.close()


def _health(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_S).status


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Stream:
    """An ExplainStream held open: ``send`` one frame and get its response."""

    def __init__(self, stub: pb_grpc.ExplainerStub, **request) -> None:
        self._frames: queue.SimpleQueue = queue.SimpleQueue()
        self._request = request
        self._responses = stub.ExplainStream(iter(self._frames.get, None), timeout=60)

    def send(self, request_id: str) -> pb.ExplainResponse:
        self._frames.put(Client.request(IMAGE, request_id=request_id, **self._request))
        return next(self._responses)

    def close(self) -> list:
        self._frames.put(None)
        return list(self._responses)


class Load:
    """Threads sending Explain calls in a loop; each outcome is (started, ended, code,
    details), times from time.monotonic()."""

    def __init__(self, stub: pb_grpc.ExplainerStub, threads: int, models=("",),
                 samples: int = SLOW, image=BIG) -> None:
        self.outcomes: list[tuple[float, float, grpc.StatusCode, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(
            stub, Client.request(image, model=models[i % len(models)], noise_samples=samples,
                                 seed=1))) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _loop(self, stub, request: pb.ExplainRequest) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = stub.Explain(request, timeout=CALL_S)
                code, details = grpc.StatusCode.OK, response.model
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            with self._lock:
                self.outcomes.append((started, time.monotonic(), code, details))

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def stop(self) -> list[tuple[float, float, grpc.StatusCode, str]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_S + 5)
        return self.outcomes


# --- SIGTERM --------------------------------------------------------------------------------
def test_sigterm_finishes_calls_in_flight_refuses_new_ones_and_exits_0(folder, spawn):
    grace = 8.0
    server = spawn(folder, "--grace-seconds", str(grace))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        stream = Stream(stub)  # a call open across the signal keeps the grace period going
        assert stream.send("before").request_id == "before"
        load = Load(stub, threads=6)
        _wait_for(lambda: load.count() >= 6, 30, "the load to run")

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        _wait_for(lambda: _health(channel) == NOT_SERVING, 5, "health NOT_SERVING")
        refused_from = time.monotonic()
        for service in ("camserve.v1.Explainer", "tiny", "tiny2"):
            assert _health(channel, service) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:  # a new call after the signal
            stub.ListModels(pb.ListModelsRequest(), timeout=CALL_S)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details()
        time.sleep(0.3)
        outcomes = load.stop()
        assert server.process.poll() is None  # the open stream still holds the server up

        # the call in flight goes on answering until its client ends it
        assert stream.send("after").request_id == "after"
        assert stream.close() == []
        server.process.wait(grace + 5)
        exited = time.monotonic()

    assert server.process.returncode == 0, server.log.read_text()[-3000:]
    assert exited - signalled < grace, "the server did not exit when its calls were done"
    codes = {code for _, _, code, _ in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes
    refused = [o for o in outcomes if o[2] == grpc.StatusCode.UNAVAILABLE]
    # every refusal is the admission gate's: no call it let in was cut off
    assert all("shutting down" in details for *_, details in refused), refused
    straddled = [o for o in outcomes if o[0] < signalled < o[1] and o[2] == grpc.StatusCode.OK]
    assert straddled, "no call was in flight at the signal"
    assert all(code == grpc.StatusCode.UNAVAILABLE for started, _, code, _ in outcomes
               if started > refused_from)
    log = server.log.read_text()
    assert "SIGTERM: shutting down" in log and "Traceback" not in log


def test_grace_period_bounds_a_call_that_does_not_end(folder, spawn):
    grace = 1.0
    server = spawn(folder, "--grace-seconds", str(grace))
    with grpc.insecure_channel(server.target) as channel:
        stream = Stream(pb_grpc.ExplainerStub(channel))
        stream.send("0")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(grace + 10)
        took = time.monotonic() - signalled
        with pytest.raises(grpc.RpcError):  # the stream was cancelled at the end of the grace
            stream.send("1")
    assert server.process.returncode == 0
    assert grace <= took < grace + 5
    assert "still in flight" in server.log.read_text()


# --- reload ---------------------------------------------------------------------------------
@pytest.fixture
def running(folder):
    server = start(ServerConfig(models=folder, port=0, device="cpu", intra_op_threads=1,
                                default_model="tiny", grace_seconds=5))
    yield server
    server.stop(grace=0)


def _reload(stub) -> pb.ReloadModelsResponse:
    return stub.ReloadModels(pb.ReloadModelsRequest(), timeout=CALL_S)


def test_reload_adds_and_drops_models(running, folder):
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        old_batchers = dict(running.batchers)
        shutil.copy(folder / "tiny.onnx", folder / "tiny3.onnx")
        (folder / "junk.onnx").write_bytes(b"not a model")
        response = _reload(stub)
        assert list(response.loaded) == ["tiny", "tiny2", "tiny3"]
        assert [r for r in response.refused if r.startswith("junk.onnx: ")], response.refused
        assert stub.Explain(Client.request(IMAGE, model="tiny3"), timeout=CALL_S).model \
            == "tiny3"
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=CALL_S)
        assert [m.name for m in listed.models] == ["tiny", "tiny2", "tiny3"]
        assert listed.default_model == "tiny"
        assert _health(channel, "tiny3") == SERVING
        # the replaced batchers close once the calls that started before the swap are done
        _wait_for(lambda: all(b.closed for b in old_batchers.values()), 5,
                  "the old batchers to close")
        assert set(running.batchers) == {"tiny", "tiny2", "tiny3"}

        (folder / "tiny2.onnx").unlink()
        assert list(_reload(stub).loaded) == ["tiny", "tiny3"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Explain(Client.request(IMAGE, model="tiny2"), timeout=CALL_S)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert _health(channel, "tiny2") == NOT_SERVING
        assert _health(channel) == SERVING
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(),
                                                timeout=CALL_S).models] == ["tiny", "tiny3"]


def test_reload_of_a_folder_without_a_model_keeps_the_old_set(running, folder):
    for path in folder.glob("*.onnx"):
        path.unlink()
    (folder / "junk.onnx").write_bytes(b"not a model")
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            _reload(stub)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no explainer graph" in caught.value.details()
        assert "still serving: tiny, tiny2" in caught.value.details()
        assert stub.Explain(Client.request(IMAGE, model="tiny2"), timeout=CALL_S).model \
            == "tiny2"
        assert _health(channel, "tiny") == SERVING


def test_reload_leaves_calls_in_flight_alone(running, folder):
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        stream = Stream(stub, model="tiny2")
        assert stream.send("0").model == "tiny2"
        load = Load(stub, threads=4, models=("", "tiny", "tiny2"), samples=0)
        _wait_for(lambda: load.count() >= 8, 30, "the load to run")
        extra = folder / "tiny3.onnx"
        for round_ in range(4):
            if round_ % 2 == 0:
                shutil.copy(folder / "tiny.onnx", extra)
            else:
                extra.unlink()
            before = load.count()
            assert ("tiny3" in _reload(stub).loaded) == (round_ % 2 == 0)
            assert stream.send(str(round_ + 1)).model == "tiny2"  # frames after the swap
            _wait_for(lambda n=before + 4: load.count() >= n, 30, "calls after the reload")
        outcomes = load.stop()
        assert len(stream.close()) == 0
    failed = [o for o in outcomes if o[2] != grpc.StatusCode.OK]
    assert not failed, failed[:5]
    assert len(outcomes) >= 20


def test_sighup_reloads_the_models_folder(folder, spawn, tmp_path):
    token = "hup-token-9f8e7d6c5b4a"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    server = spawn(folder, "--auth-token-file", str(token_file))
    with Client(server.target, token=token, timeout=CALL_S) as client:
        assert {m.name for m in client.list_models()} == {"tiny", "tiny2"}
        shutil.copy(folder / "tiny.onnx", folder / "tiny3.onnx")
        server.process.send_signal(signal.SIGHUP)
        _wait_for(lambda: "tiny3" in {m.name for m in client.list_models()}, 15,
                  "tiny3 after SIGHUP")
        assert client.explain(IMAGE, model="tiny3")[0].model == "tiny3"
        assert client.health("tiny3") == "SERVING"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(15) == 0
    log = server.log.read_text()
    assert "SIGHUP: reloading" in log and "reloaded: serving tiny, tiny2, tiny3" in log
    assert token not in log and token not in server.process.stdout.read()


# --- health under saturation ------------------------------------------------------------------
def test_health_port_answers_when_the_server_is_saturated(models_dir):
    """With every call slot taken (workers 1, no queue: one open stream), the main port
    refuses even health checks (RESOURCE_EXHAUSTED), which would make a proxy take every
    saturated replica out; ``--health-port`` still answers SERVING, and NOT_SERVING on stop."""
    running = start(ServerConfig(models=models_dir, port=0, device="cpu", intra_op_threads=1,
                                 workers=1, max_queue=0, health_port=0))
    main = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    health_only = grpc.insecure_channel(f"127.0.0.1:{running.health_port}")
    try:
        assert running.health_port not in (None, 0, running.port)
        assert _health(main) == _health(health_only) == SERVING
        stream = Stream(pb_grpc.ExplainerStub(main))
        assert stream.send("holds the only slot").targets  # the stream is running now
        with pytest.raises(grpc.RpcError) as refused:
            _health(main)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _health(health_only) == SERVING
        with pytest.raises(grpc.RpcError) as other:  # the health port serves nothing else
            pb_grpc.ExplainerStub(health_only).ListModels(pb.ListModelsRequest(), timeout=5)
        assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
        watch = health_pb2_grpc.HealthStub(health_only).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
        with pytest.raises(grpc.RpcError) as streamed:  # Check only: no thread held by a stream
            next(watch)
        assert streamed.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stream.close()
        stopping = threading.Thread(target=running.stop, kwargs={"grace": 5})
        stopping.start()
        _wait_for(lambda: _health(health_only) == NOT_SERVING, 5, "NOT_SERVING on stop")
        stopping.join(10)
    finally:
        main.close()
        health_only.close()
        running.stop(grace=0)


def test_health_port_that_is_taken_is_one_error_line(models_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "camserve", "serve", "--models", str(models_dir),
             "--port", "0", "--health-port", str(port), "--device", "cpu"],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("camserve serve: error: cannot bind the health port 127.0.0.1:")
    assert "Traceback" not in result.stderr
