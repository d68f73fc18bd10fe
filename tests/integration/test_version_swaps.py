"""Model version swaps under load: 16 clients call without pause while the models folder is
replaced by a new version (an atomic symlink swap, as a deployment does it) and reloaded:
ReloadModels, SIGHUP to ``camserve serve``, and a rolling restart of a cluster's replicas
(SIGHUP to ``camserve cluster``).

No call fails; every response names one version, and its scores are that version's, so the
session that ran it was that version's; calls that start after the swap get the new one; an
ExplainStream open across the swap runs its next frame on the new one and keeps nothing of
the old set alive; the old sessions and batchers are freed once their last call ended (a
weak reference dies, the server's RSS is back near its level before)."""

from __future__ import annotations

import gc
import os
import queue
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import psutil
import pytest
import torch
from conftest import TinyNet
from serve_process import ServeProcess

from camserve.errors import CamserveError
from camserve.explain.pipeline import Pipeline
from camserve.server.cluster import probes
from camserve.server.cluster.options import ClusterConfig, find_envoy
from camserve.server.cluster.supervisor import start_cluster
from camserve.server.config import ServerConfig
from camserve.server.runtime import load_models
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

try:
    ENVOY = find_envoy()
except CamserveError:
    ENVOY = None

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and symlinks")

CLIENTS = 16
CALL_S = 30
WIDE = 500_000  # hidden units of "wide": ~52 MB of weights per file, far above the RSS noise
# that heap fragmentation under load leaves (up to ~20 MB), so RSS shows whether a version stays
PHOTO = cv2.imencode(".png", np.random.default_rng(7).integers(0, 256, (48, 64, 3),
                                                                  dtype=np.uint8))[1].tobytes()


def _net(seed: int, wide: bool) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = TinyNet()
    if wide:
        net.fc = torch.nn.Sequential(torch.nn.Linear(16, WIDE), torch.nn.ReLU(),
                                     torch.nn.Linear(WIDE, 10))
    return net.eval()


@dataclass(frozen=True)
class Version:
    """One version of the models folder: ``tiny`` and ``wide``, their file versions and the
    top class and its logit that each gives for ``PHOTO``."""

    folder: Path
    versions: dict[str, str]
    answers: dict[str, tuple[int, float]]


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> tuple[Version, Version]:
    """Two versions of a models folder, the same networks with other weights."""
    from camserve.export import export_explainer

    made = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"v{seed + 1}")
        for name, wide in (("tiny", False), ("wide", True)):
            export_explainer(_net(seed, wide), folder / f"{name}.onnx", input_size=64,
                             architecture="tinynet")
        models = load_models(folder, device="cpu", threads=1)
        answers = {}
        for name, model in models.items():
            explained = Pipeline().explain(pb.ExplainRequest(encoded=PHOTO, top_k=1), model)
            top = explained.targets[0]
            answers[name] = (top.class_index, top.logit)
        made.append(Version(folder, {n: m.version for n, m in models.items()}, answers))
        del models
    assert made[0].versions["tiny"] != made[1].versions["tiny"]
    assert made[0].answers["tiny"] != made[1].answers["tiny"]
    return made[0], made[1]


def _point(link: Path, version: Version) -> None:
    """Make ``link`` (the models folder) name ``version``'s folder, atomically."""
    staged = link.with_name(link.name + ".new")
    staged.unlink(missing_ok=True)
    staged.symlink_to(version.folder, target_is_directory=True)
    os.replace(staged, link)


@pytest.fixture
def models(tmp_path, versions) -> Path:
    link = tmp_path / "models"
    _point(link, versions[0])
    return link


@dataclass
class Call:
    started: float
    ended: float
    code: str
    version: str = ""
    answer: tuple[int, float] | None = None


class Load:
    """``CLIENTS`` threads calling Explain on ``model`` without pause, no client retries."""

    def __init__(self, target: str, model: str) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
        stub = pb_grpc.ExplainerStub(self._channel)
        request = pb.ExplainRequest(encoded=PHOTO, top_k=1, model=model)
        self._threads = [threading.Thread(target=self._loop, args=(stub, request))
                         for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _loop(self, stub: pb_grpc.ExplainerStub, request: pb.ExplainRequest) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = stub.Explain(request, timeout=CALL_S)
                top = response.targets[0]
                call = Call(started, time.monotonic(), "OK", response.model_version,
                            (top.class_index, top.logit))
            except grpc.RpcError as exc:
                call = Call(started, time.monotonic(), f"{exc.code().name}: {exc.details()}")
            with self._lock:
                self.calls.append(call)

    def count(self, version: str = "") -> int:
        with self._lock:
            return sum(1 for c in self.calls if not version or c.version == version)

    def wait_for(self, count: int, version: str = "", timeout: float = 60) -> Load:
        deadline = time.monotonic() + timeout
        while self.count(version) < count:
            assert time.monotonic() < deadline, f"fewer than {count} calls of {version!r}"
            time.sleep(0.01)
        return self

    def stop(self) -> list[Call]:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_S + 5)
        self._channel.close()
        return self.calls


def check_calls(calls: list[Call], name: str, old: Version, new: Version,
                swapped: float) -> None:
    """No failure; each response names one of the two versions and carries its answer;
    every call that started once the swap was over got the new version."""
    failed = [c.code for c in calls if c.code != "OK"]
    assert not failed, (len(failed), failed[:3])
    by_version = {old.versions[name]: old, new.versions[name]: new}
    for call in calls:
        assert call.version in by_version, call
        want = by_version[call.version].answers[name]
        assert call.answer[0] == want[0] and call.answer[1] == pytest.approx(want[1],
                                                                            rel=1e-4), call
    late = [c for c in calls if c.started > swapped]
    assert late and all(c.version == new.versions[name] for c in late), \
        [c for c in late if c.version != new.versions[name]][:3]
    assert any(c.version == old.versions[name] for c in calls)


class Stream:
    """An ExplainStream held open: ``send`` a frame and get its response."""

    def __init__(self, target: str, model: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._frames: queue.SimpleQueue = queue.SimpleQueue()
        self._request = pb.ExplainRequest(encoded=PHOTO, top_k=1, model=model)
        self._responses = pb_grpc.ExplainerStub(self._channel).ExplainStream(
            iter(self._frames.get, None), timeout=120)

    def send(self) -> pb.ExplainResponse:
        self._frames.put(self._request)
        return next(self._responses)

    def close(self) -> None:
        self._frames.put(None)
        list(self._responses)
        self._channel.close()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- ReloadModels ---------------------------------------------------------------------------
def test_reload_models_under_load_swaps_versions_and_frees_the_old_set(models, versions):
    """Seen failing before the fix: the stream open across the reload kept the old batchers,
    and with them the old sessions, until the grace period (30 s here) was over."""
    from camserve.server.app import start

    old, new = versions
    running = start(ServerConfig(models=models, port=0, device="cpu", intra_op_threads=1,
                                 grace_seconds=30))
    target = f"127.0.0.1:{running.port}"
    try:
        stream = Stream(target, "tiny")
        assert stream.send().model_version == old.versions["tiny"]
        old_model = weakref.ref(running.models["tiny"])
        old_batcher = weakref.ref(running.batchers["tiny"])
        load = Load(target, "tiny")
        load.wait_for(50)
        _point(models, new)
        with grpc.insecure_channel(target) as channel:
            reloaded = pb_grpc.ExplainerStub(channel).ReloadModels(pb.ReloadModelsRequest(),
                                                                   timeout=CALL_S)
        swapped = time.monotonic()
        assert list(reloaded.loaded) == ["tiny", "wide"]
        load.wait_for(load.count() + 50)  # calls that start after the swap
        calls = load.stop()
        check_calls(calls, "tiny", old, new, swapped)
        # the stream's next frame runs on the new version, and the old set is gone while
        # the stream stays open
        assert stream.send().model_version == new.versions["tiny"]
        _wait_for(lambda: (batcher := old_batcher()) is None or batcher.closed, 5,
                  "the old batcher to close")
        _wait_for(lambda: gc.collect() is not None and old_model() is None, 5,
                  "the old session to be freed")
        stream.close()
    finally:
        running.stop(grace=0)


def _stop_cleanly(process: subprocess.Popen, log: Path, wait_s: float, logged: str) -> None:
    """SIGTERM: exit 0 within ``wait_s``, ``logged`` in the log and no traceback."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(wait_s) == 0
    text = log.read_text()
    assert logged in text
    assert "Traceback" not in text


def _reap(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)
    process.stdout.close()


# --- SIGHUP to camserve serve -------------------------------------------------------------
def _rss(process: psutil.Process, seconds: float) -> float:
    """The median of the RSS sampled over ``seconds``."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(process.memory_info().rss)
        time.sleep(0.02)
    return statistics.median(samples)


def test_sighup_under_load_swaps_versions_and_rss_comes_back(models, versions, tmp_path):
    """Seen failing before the fix: with a stream open across the reload the old "wide"
    session stayed resident until the grace period ended (RSS +50 MB and more)."""
    old, new = versions
    version_bytes = sum(p.stat().st_size for p in old.folder.glob("wide*.onnx"))
    log = tmp_path / "serve.log"
    with ServeProcess(models, log, "--grace-seconds", "30") as served:
        process, target = served.process, served.target
        server = psutil.Process(process.pid)
        stream = Stream(target, "wide")
        assert stream.send().model_version == old.versions["wide"]
        Load(target, "wide").wait_for(100).stop()  # warm: every worker thread has run
        before = _rss(server, 0.5)  # quiet, the stream open
        load = Load(target, "wide")
        load.wait_for(100)
        _point(models, new)
        process.send_signal(signal.SIGHUP)
        signalled = time.monotonic()
        peak = before
        while load.count(new.versions["wide"]) < 20:  # both versions resident meanwhile
            peak = max(peak, server.memory_info().rss)
            assert time.monotonic() < signalled + 60, "no call got the new version"
            time.sleep(0.01)
        # the swap was over once a call had got the new version
        swapped = min(c.ended for c in load.calls if c.version == new.versions["wide"])
        load.wait_for(load.count() + 100)
        calls = load.stop()
        assert stream.send().model_version == new.versions["wide"]
        after = _rss(server, 0.5)  # quiet again, the stream still open
        stream.close()
        print(f"\nRSS before {before / 2**20:.0f} MiB, during the swap up to "
              f"{peak / 2**20:.0f}, after {after / 2**20:.0f} (one version of 'wide': "
              f"{version_bytes / 2**20:.0f} MB on disk); {len(calls)} calls")
        check_calls(calls, "wide", old, new, swapped)
        assert peak - before > version_bytes / 2  # the measure sees a version's size
        assert after - before < version_bytes / 2
        _stop_cleanly(process, log, 30,
                      f"(versions {new.versions['tiny']}, {new.versions['wide']})")


# --- a cluster: rolling restart -----------------------------------------------------------
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (camserve[cluster])")


@needs_envoy
def test_rolling_restart_under_load_swaps_versions_without_a_failed_call(models, versions,
                                                                         tmp_path):
    old, new = versions
    with (tmp_path / "children.log").open("w") as output, start_cluster(ClusterConfig(
            ServerConfig(models=models, device="cpu", intra_op_threads=1, grace_seconds=2,
                         default_model="tiny"),
            replicas=2, port=0, output=output)) as cluster:
        pids = [r.pid for r in cluster.replicas]
        load = Load(cluster.address, "tiny")
        load.wait_for(50)
        serving: list[int] = []
        done = threading.Event()

        def watch() -> None:  # how many replicas answer SERVING, all along the restart
            while not done.is_set():
                serving.append(sum(probes.health_status(r.health_address, 0.5) == "SERVING"
                                   for r in cluster.replicas))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        _point(models, new)
        try:
            assert cluster.rolling_restart()
        finally:
            done.set()
            watcher.join()
        swapped = time.monotonic()
        load.wait_for(load.count() + 50)  # calls that start after the swap
        calls = load.stop()
        check_calls(calls, "tiny", old, new, swapped)
        assert min(serving) == 1 and 2 in serving, serving  # never fewer than N - 1
        assert all(r.pid != pid and r.alive() for r, pid in zip(cluster.replicas, pids))


@needs_envoy
def test_sighup_to_the_cluster_command_replaces_its_replicas(models, versions, tmp_path):
    old, new = versions
    log = tmp_path / "cluster.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "camserve", "cluster", "--replicas", "1", "--models",
             str(models), "--port", "0", "--device", "cpu", "--intra-op-threads", "1",
             "--grace-seconds", "1", "--default-model", "tiny"],
            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        line = process.stdout.readline() if ready else ""
        found = re.fullmatch(r"camserve cluster: serving on (127\.0\.0\.1:\d+) .*\n", line)
        assert found, (line, log.read_text()[-3000:])
        with grpc.insecure_channel(found.group(1)) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            request = pb.ExplainRequest(encoded=PHOTO, top_k=1)
            assert stub.Explain(request, timeout=CALL_S).model_version == old.versions["tiny"]
            _point(models, new)
            process.send_signal(signal.SIGHUP)
            _wait_for(lambda: "rolling restart done" in log.read_text(), 60,
                      "the rolling restart")
            assert stub.Explain(request, timeout=CALL_S,
                                wait_for_ready=True).model_version == new.versions["tiny"]
        _stop_cleanly(process, log, 60, "SIGHUP: replacing the replicas one at a time")
    finally:
        _reap(process)
