"""Soak: mixed traffic against a 3-replica ``camserve cluster`` while replicas are SIGKILLed.

``.venv/bin/python bench/soak.py [--minutes 10] [--kill-every 60] [--models models]
[--json FILE]`` (``make bench-soak MINUTES=10``)

The cluster (``camserve cluster``: replicas behind Envoy, server/cluster/) runs in a
subprocess; the load generators are threads of this process, each with its own gRPC channel
to Envoy with the client's own retries OFF, so every failure Envoy and the cluster let
through is seen. Closed loop (each client sends its next call when the last one ended):

- unary clients pick each call from ``UNARY_MIX``: Explain of a small JPEG, large frames (a
  4K JPEG, a raw RGB8 frame of 15 MiB, near the 16 MiB message limit), cancellations (the
  client cancels mid-call; a 30 ms deadline on a 4K JPEG) and malformed requests (garbage
  image bytes, a tensor of the wrong shape, an unknown model or method, a raw frame whose
  byte count contradicts its size, bytes that are no protobuf, a message over the limit);
- stream clients open ExplainStreams from ``STREAM_MIX``: every frame explained, latest
  frame wins at 30 fps, cancelled by the client after a few answers, a 1 s deadline, one
  garbage frame among good ones.

Answers are checked, not only codes: an OK answer to a well-formed unary call has one target
with a map, of the class a reference call before the load got for the same request; a stream
answers every frame it was sent once (explained, skipped, or refused: only its garbage frame)
and an every-frame stream skips none.

Every ``--kill-every`` seconds one replica gets SIGKILL (the supervisor restarts it): the
replicas take turns, except the first ``--spared`` of them, which live through the whole
run so that a leak has the run's full length to show. A sampler reads, every
``--sample-every`` seconds, each replica's RSS, threads and open files (its pid found among
the ``camserve cluster`` process's children, its index from its ``--metrics-port``), its
``camserve_in_flight`` gauge, and the same figures for Envoy and the supervisor.

What a SIGKILL may cost (``KILL_CODES``, ``KILL_WINDOW_S``): no unary call (a call the killed
replica had taken is reset, and Envoy retries it on another replica), but a stream that was
open on it, whose answers had already started, which Envoy cannot retry: it may end
UNAVAILABLE or INTERNAL (an HTTP/2 reset) within ``KILL_WINDOW_S`` of a kill; likewise a
message over Envoy's retry buffer (kind "oversize"). Anything else that is not the kind's
expected answer (``EXPECTED``) is an unexpected failure.

Leaks (``LEAK_BOUNDS``): for every process that lives through the run (the spared replicas,
Envoy, the supervisor), the median of its samples at the end of the run (last 15%) against
the median just after the warm-up (20-35% of the run); growth beyond a bound fails the run.
The killed replicas' figures at each death are listed, not judged (each lives a few minutes).

The report (stdout; ``--json FILE`` too) gives calls and failures by gRPC status code,
latency medians and p99 per kind, the kills and how long each replica took to come back,
RSS/threads/fds per process over time, the end checks (each killed replica healthy in Envoy
again before the next kill, nothing left in flight, health through Envoy, a clean SIGTERM)
and one VERDICT line; the exit status is 0 for PASS, 1 for FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import psutil

from camserve.client.options import ExplainOptions, StreamOptions
from camserve.client.video import pan_zoom_clip
from camserve.server.cluster import probes
from camserve.server.config import ServerConfig
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024

# --- the run's defaults (the command line's, once) ------------------------------------------------
MINUTES = 10.0
KILL_EVERY_S = 60.0
SAMPLE_EVERY_S = 5.0
REPLICAS = 3
SPARED = 1  # replicas 0..SPARED-1 are never killed: the long-lived witnesses for leaks
UNARY_CLIENTS = 4
STREAM_CLIENTS = 2
INTRA_OP_THREADS = 1  # per replica: 3 replicas on a 2-core machine
UNARY_TIMEOUT_S = 30.0  # a normal call's deadline (the SDK's default)
STREAM_TIMEOUT_S = 60.0
START_TIMEOUT_S = 240.0  # the cluster's start on a busy 2-core machine
STOP_TIMEOUT_S = 60.0  # the replicas' 10 s grace, the supervisor's margins, Envoy's stop
MAX_MESSAGE_BYTES = ServerConfig().max_message_bytes  # the replicas' limit (16 MiB)

# --- the traffic ----------------------------------------------------------------------------------
# unary calls: kind -> weight (about 13% malformed; streams add their garbage frames)
UNARY_MIX = {
    "unary": 60, "large-jpeg": 6, "large-raw": 5, "cancel": 8, "deadline": 8,
    "garbage-bytes": 3, "wrong-shape": 3, "unknown-model": 2, "unknown-method": 2,
    "bad-frame": 1, "not-protobuf": 1, "oversize": 1,
}
STREAM_MIX = {"stream": 4, "stream-lfw": 4, "stream-cancel": 2, "stream-deadline": 1,
              "stream-bad-frame": 1}
# what each kind must be answered with; the malformed ones are "refused as expected"
EXPECTED: dict[str, frozenset[str]] = {
    "unary": frozenset({"OK"}), "large-jpeg": frozenset({"OK"}),
    "large-raw": frozenset({"OK"}),
    "cancel": frozenset({"CANCELLED", "OK"}),  # OK: answered before the client cancelled
    "deadline": frozenset({"DEADLINE_EXCEEDED", "OK"}),
    "garbage-bytes": frozenset({"INVALID_ARGUMENT"}),
    "wrong-shape": frozenset({"INVALID_ARGUMENT"}),
    "unknown-model": frozenset({"NOT_FOUND"}),
    "unknown-method": frozenset({"INVALID_ARGUMENT"}),
    "bad-frame": frozenset({"INVALID_ARGUMENT"}),
    "not-protobuf": frozenset({"INVALID_ARGUMENT"}),  # no message parses from its bytes
    "oversize": frozenset({"RESOURCE_EXHAUSTED"}),
    "stream": frozenset({"OK"}), "stream-lfw": frozenset({"OK"}),
    "stream-cancel": frozenset({"CANCELLED"}),
    "stream-deadline": frozenset({"DEADLINE_EXCEEDED"}),
    "stream-bad-frame": frozenset({"OK"}),  # the stream goes on; its garbage frame is refused
}
MALFORMED = frozenset({"garbage-bytes", "wrong-shape", "unknown-model", "unknown-method",
                       "bad-frame", "not-protobuf", "oversize", "stream-bad-frame"})
CANCELLATIONS = frozenset({"cancel", "deadline", "stream-cancel", "stream-deadline"})
# stream kind -> (frames offered, frames per second, latest frame wins): every-frame streams
# at 12 fps, which the replicas keep up with; latest-frame-wins at 30 fps, which they do not
STREAM_SHAPES = {"stream": (24, 12.0, False), "stream-lfw": (60, 30.0, True),
                 "stream-cancel": (24, 12.0, False), "stream-deadline": (60, 30.0, True),
                 "stream-bad-frame": (12, 12.0, False)}
CANCEL_AFTER = 4  # stream-cancel: answers read before the client cancels
STREAM_DEADLINE_S = 1.0  # stream-deadline: its frames take 2 s to offer
BAD_FRAME_INDEX = 5  # stream-bad-frame: its garbage frame
DEADLINE_S = 0.03  # "deadline": the deadline of a 4K JPEG call

# --- what a SIGKILL may cost, and the leak bounds -------------------------------------------------
KILL_CODES = frozenset({"UNAVAILABLE", "INTERNAL"})  # a stream reset by the killed replica
KILL_LOSS_KINDS = frozenset({*STREAM_MIX, "oversize"})  # what Envoy cannot retry
KILL_WINDOW_S = 5.0  # such a loss ends this soon after the kill
RECOVERY_S = 15.0  # no kill later than this before the end: the replica has time to return
BASELINE_WINDOW = (0.20, 0.35)  # fractions of the run: after the warm-up
END_WINDOW = (0.85, 1.0)
# process role -> (RSS growth in MiB, as a fraction of the baseline, threads, fds): the larger
# of the two RSS bounds applies. A replica's RSS settles as its workers' malloc arenas fill
# (4K and 15 MiB frames); its worker pool (``workers``) starts threads lazily up to its size,
# which is no leak; fds move with Envoy's connections. The supervisor and Envoy keep theirs.
LEAK_BOUNDS = {"replica": (64.0, 0.20, ServerConfig().workers, 16),
               "envoy": (32.0, 0.20, 2, 16), "supervisor": (16.0, 0.20, 2, 8)}


# --- recording -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One call: its kind, gRPC status name, start and end (seconds since the run began) and,
    when it broke a rule of its kind (a stream that lost frames...), ``broken``."""

    kind: str
    code: str
    started: float
    ended: float
    detail: str = ""
    broken: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1e3


@dataclass
class Kill:
    """One SIGKILL: when (s since the start), which replica and pid, and when (s after the
    kill) its new process existed, answered health SERVING and Envoy counted it healthy."""

    at: float
    replica: int
    pid: int
    new_pid: int | None = None
    restarted_s: float | None = None
    serving_s: float | None = None
    healthy_s: float | None = None


class Recorder:
    """What the load generators saw: outcomes, and per-frame latencies (ms) of streams."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.outcomes: list[Outcome] = []
        self.frame_ms: dict[str, list[float]] = defaultdict(list)
        self.skipped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def frames(self, kind: str, latencies: list[float], skipped: int) -> None:
        with self._lock:
            self.frame_ms[kind] += latencies
            self.skipped[kind] += skipped

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


# --- payloads ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payloads:
    """The requests, built once: every call of a kind sends the same bytes."""

    small: pb.ExplainRequest  # samples/cat.jpg (451x300 JPEG)
    large_jpeg: pb.ExplainRequest  # 3840x2160 JPEG q90
    large_raw: pb.ExplainRequest  # 2560x2048 RGB8, 15 MiB
    oversize: pb.ExplainRequest  # 17 MiB of RGB8: over the message limit
    malformed: dict[str, bytes]  # kind -> serialized request (or not-protobuf bytes)
    stream_frames: list[pb.ExplainRequest]  # 640x480 JPEG q90, a pan-and-zoom clip


def _jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _raw(height: int, width: int, photo: np.ndarray) -> pb.ExplainRequest:
    frame = cv2.resize(photo, (width, height), interpolation=cv2.INTER_LINEAR)
    return ExplainOptions().to_request(frame)


def build_payloads() -> Payloads:
    """Every request the soak sends, from samples/cat.jpg."""
    photo = cv2.cvtColor(cv2.imread(str(ROOT / "samples" / "cat.jpg")), cv2.COLOR_BGR2RGB)
    options = ExplainOptions()
    small = options.to_request((ROOT / "samples" / "cat.jpg").read_bytes())
    large_jpeg = options.to_request(_jpeg(cv2.resize(photo, (3840, 2160))))
    large_raw = _raw(2048, 2560, photo)
    oversize = _raw(2048, 2912, photo)  # 17.1 MiB
    assert large_raw.ByteSize() < MAX_MESSAGE_BYTES < oversize.ByteSize()
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    bad_frame = pb.ExplainRequest(top_k=1, pixels=pb.RawImage(
        height=480, width=640, format=pb.RGB8, pixels=b"\x80" * 1000))
    malformed = {
        "garbage-bytes": options.to_request(garbage),
        "wrong-shape": options.to_request(tensor=np.zeros((1, 3, 97, 97), np.float32)),
        "unknown-model": ExplainOptions(model="no-such-model").to_request(
            (ROOT / "samples" / "cat.jpg").read_bytes()),
        "unknown-method": ExplainOptions(method="no-such-cam").to_request(
            (ROOT / "samples" / "cat.jpg").read_bytes()),
        "bad-frame": bad_frame,
    }
    wire = {kind: request.SerializeToString() for kind, request in malformed.items()}
    # tag 0x0f is field 1 with wire type 7, which does not exist: no parser accepts it
    wire["not-protobuf"] = b"\x0f" * 64
    clip = pan_zoom_clip(photo, seconds=2.0, fps=15, size=(640, 480))
    frames = [options.to_request(_jpeg(frame)) for frame in clip]
    return Payloads(small, large_jpeg, large_raw, oversize, wire, frames)


# --- load generators -----------------------------------------------------------------------------
def channel_to(address: str) -> grpc.Channel:
    """A channel with gRPC's own retries off: every failure Envoy lets through is seen."""
    return grpc.insecure_channel(address, options=[
        ("grpc.enable_retries", 0),
        ("grpc.max_send_message_length", 64 * MIB),
        ("grpc.max_receive_message_length", 64 * MIB)])


def _code(error: grpc.RpcError) -> tuple[str, str]:
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else "") or ""
    return (code.name if code is not None else "UNKNOWN"), details[:200]


ANSWERED_KINDS = ("unary", "large-jpeg", "large-raw")  # kinds whose answers are checked


def answer_of(payloads: Payloads, kind: str) -> pb.ExplainRequest:
    """The well-formed request of ``kind``."""
    return {"unary": payloads.small, "large-jpeg": payloads.large_jpeg,
            "large-raw": payloads.large_raw, "oversize": payloads.oversize}[kind]


def reference_classes(address: str, payloads: Payloads) -> dict[str, int]:
    """Each answered kind's predicted class, asked once before the load: every later answer
    to the same request must name the same class (a mixed-up or corrupt answer would not)."""
    with channel_to(address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        return {kind: stub.Explain(answer_of(payloads, kind),
                                   timeout=UNARY_TIMEOUT_S).targets[0].class_index
                for kind in ANSWERED_KINDS}


class UnaryClient:
    """One closed-loop client of unary calls, each of a kind drawn from ``UNARY_MIX``; an
    answer of ``ANSWERED_KINDS`` must name its request's class in ``references``."""

    def __init__(self, address: str, payloads: Payloads, recorder: Recorder, seed: int,
                 references: dict[str, int]) -> None:
        self.references = references
        self.channel = channel_to(address)
        self.stub = pb_grpc.ExplainerStub(self.channel)
        # the malformed requests go out as they are: bytes in, bytes out
        self.raw = self.channel.unary_unary("/camserve.v1.Explainer/Explain",
                                            request_serializer=None,
                                            response_deserializer=None)
        self.payloads = payloads
        self.recorder = recorder
        self.rng = random.Random(seed)

    def run(self, stop: threading.Event) -> None:
        kinds, weights = zip(*UNARY_MIX.items())
        try:
            while not stop.is_set():
                self.call(self.rng.choices(kinds, weights)[0])
        finally:
            self.channel.close()

    def call(self, kind: str) -> None:
        p = self.payloads
        started = self.recorder.now()
        code, detail, broken = "OK", "", ""
        try:
            if kind == "cancel":
                future = self.stub.Explain.future(p.small, timeout=UNARY_TIMEOUT_S)
                time.sleep(self.rng.uniform(0.005, 0.08))
                future.cancel()
                future.result()
            elif kind == "deadline":
                self.stub.Explain(p.large_jpeg, timeout=DEADLINE_S)
            elif kind in p.malformed:
                self.raw(p.malformed[kind], timeout=UNARY_TIMEOUT_S)
            else:
                answer = self.stub.Explain(answer_of(p, kind), timeout=UNARY_TIMEOUT_S)
                broken = self._wrong(kind, answer)
        except grpc.FutureCancelledError:
            code = "CANCELLED"
        except grpc.RpcError as error:
            code, detail = _code(error)
        self.recorder.add(Outcome(kind, code, started, self.recorder.now(), detail, broken))

    def _wrong(self, kind: str, answer: pb.ExplainResponse) -> str:
        """What is wrong with an OK answer ("" when nothing): one target with a map, of the
        request's reference class."""
        if kind not in self.references:
            return ""
        if len(answer.targets) != 1 or not answer.targets[0].HasField("cam"):
            return f"{len(answer.targets)} targets, expected 1 with a map"
        if answer.targets[0].class_index != self.references[kind]:
            return (f"class {answer.targets[0].class_index}, expected "
                    f"{self.references[kind]}")
        return ""


class StreamClient:
    """One closed-loop client of ExplainStreams, each of a kind drawn from ``STREAM_MIX``."""

    def __init__(self, address: str, payloads: Payloads, recorder: Recorder, seed: int) -> None:
        self.channel = channel_to(address)
        self.stub = pb_grpc.ExplainerStub(self.channel)
        self.payloads = payloads
        self.recorder = recorder
        self.rng = random.Random(seed)

    def run(self, stop: threading.Event) -> None:
        kinds, weights = zip(*STREAM_MIX.items())
        try:
            while not stop.is_set():
                self.stream(self.rng.choices(kinds, weights)[0])
        finally:
            self.channel.close()

    def _offered(self, kind: str, sent: dict[str, float]) -> Iterator[pb.ExplainRequest]:
        """The stream's requests at its frame rate, each stamped when it goes out."""
        frames = self.payloads.stream_frames
        count, fps, lfw = STREAM_SHAPES[kind]
        start = time.monotonic()
        for i in range(count):
            time.sleep(max(0.0, start + i / fps - time.monotonic()))
            request = pb.ExplainRequest()
            if kind == "stream-bad-frame" and i == BAD_FRAME_INDEX:
                request.ParseFromString(self.payloads.malformed["garbage-bytes"])
            else:
                request.CopyFrom(frames[i % len(frames)])
            request.request_id = str(i)
            if i == 0:
                request.stream.CopyFrom(StreamOptions(latest_frame_wins=lfw).to_proto())
            sent[request.request_id] = time.monotonic()
            yield request

    def stream(self, kind: str) -> None:
        sent: dict[str, float] = {}
        started = self.recorder.now()
        timeout = STREAM_DEADLINE_S if kind == "stream-deadline" else STREAM_TIMEOUT_S
        call = self.stub.ExplainStream(self._offered(kind, sent), timeout=timeout)
        answered, skipped, latencies, errors, strangers = 0, 0, [], [], []
        code, detail = "OK", ""
        try:
            for response in call:
                if response.HasField("stream_stats") and not (
                        response.request_id or response.skipped or response.targets):
                    continue  # the stats-only last response
                now = time.monotonic()
                answered += 1
                if response.request_id not in sent:
                    strangers.append(response.request_id)
                elif response.HasField("error"):
                    errors.append(_code_name(response.error.code))
                elif response.skipped:
                    skipped += 1
                else:
                    latencies.append((now - sent[response.request_id]) * 1e3)
                if kind == "stream-cancel" and answered == CANCEL_AFTER:
                    call.cancel()
        except grpc.RpcError as error:
            code, detail = _code(error)
        if kind in ("stream", "stream-lfw") and code == "OK":
            self.recorder.frames(kind, latencies, skipped)
        broken = (f"answers to frames never sent: {strangers[:3]}" if strangers
                  else _stream_rule(kind, code, len(sent), answered, skipped, errors))
        self.recorder.add(Outcome(kind, code, started, self.recorder.now(), detail, broken))


def _code_name(value: int) -> str:
    """A numeric gRPC status code's name ("INVALID_ARGUMENT"; "UNKNOWN" when none)."""
    return next((status.name for status in grpc.StatusCode if status.value[0] == value),
                "UNKNOWN")


def _stream_rule(kind: str, code: str, offered: int, answered: int, skipped: int,
                 errors: list[str]) -> str:
    """What a stream that ended with ``code`` broke of its kind's rules ("" when none): every
    offered frame is answered once (explained, skipped, or refused); only the garbage frame
    of stream-bad-frame is refused; an every-frame stream skips none."""
    if code != "OK":
        return ""  # a cancelled, expired or broken stream answers what it got to
    if answered != offered:
        return f"{offered} frames offered, {answered} answered"
    wanted = ["INVALID_ARGUMENT"] if kind == "stream-bad-frame" else []
    if errors != wanted:
        return f"frames refused: {errors or 'none'}, expected {wanted or 'none'}"
    if kind in ("stream", "stream-bad-frame") and skipped:
        return f"{skipped} frames skipped in an every-frame stream"
    return ""


# --- the cluster ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive loopback ports free now (the replicas' metrics
    ports are ``--metrics-port-base`` + index)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in held:
                probe.close()
    raise RuntimeError(f"no {count} consecutive free loopback ports found")


def _flag(cmdline: list[str], flag: str) -> int | None:
    if flag in cmdline:
        index = cmdline.index(flag)
        if index + 1 < len(cmdline) and cmdline[index + 1].isdigit():
            return int(cmdline[index + 1])
    return None


@dataclass(frozen=True)
class Member:
    """A process of the cluster: its role ("replica", "envoy", "supervisor"), replica index
    (-1 for the others), pid and, for replicas, its gRPC and health ports."""

    role: str
    index: int
    pid: int
    port: int | None = None
    health_port: int | None = None

    @property
    def name(self) -> str:
        return f"replica {self.index}" if self.role == "replica" else self.role


class Cluster:
    """``camserve cluster`` in a subprocess, its output in ``log``; ``members`` finds its
    processes among the supervisor's children."""

    def __init__(self, models: Path, replicas: int, threads: int, log: Path) -> None:
        self.replicas = replicas
        self.port = free_port()
        self.admin_port = free_port()
        self.metrics_base = free_port_run(replicas)
        self.log = log
        self.address = f"127.0.0.1:{self.port}"
        self.admin = f"127.0.0.1:{self.admin_port}"
        argv = [sys.executable, "-m", "camserve", "cluster", "--replicas", str(replicas),
                "--models", str(models), "--port", str(self.port),
                "--admin-port", str(self.admin_port),
                "--metrics-port-base", str(self.metrics_base), "--device", "cpu",
                "--intra-op-threads", str(threads)]
        with open(log, "w") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=ROOT)
        self.pid = self.process.pid

    def wait_serving(self, timeout: float) -> None:
        """Return once the cluster printed its address; SystemExit with its last output when
        it exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if "camserve cluster: serving on" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace").splitlines()[-5:]
        self.stop()
        sys.exit("soak: the cluster did not start:\n" + "\n".join(tail))

    def members(self) -> list[Member]:
        """The supervisor, Envoy and the replicas now running (a just-killed replica is
        absent until its restart)."""
        found = [Member("supervisor", -1, self.pid)]
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        for child in children:
            try:
                cmdline = child.cmdline()
                if child.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped
                    continue
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            metrics = _flag(cmdline, "--metrics-port")
            if "serve" in cmdline and metrics is not None:
                found.append(Member("replica", metrics - self.metrics_base, child.pid,
                                    _flag(cmdline, "--port"), _flag(cmdline, "--health-port")))
            elif cmdline and "envoy" in Path(cmdline[0]).name:
                found.append(Member("envoy", -1, child.pid))
        return found

    def replica(self, index: int) -> Member | None:
        return next((m for m in self.members() if m.role == "replica" and m.index == index),
                    None)

    def in_flight(self, index: int) -> float | None:
        """Replica ``index``'s ``camserve_in_flight`` gauge (None when it does not answer)."""
        url = f"http://127.0.0.1:{self.metrics_base + index}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        found = re.search(r"^camserve_in_flight\s+(\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    def default_model(self) -> str:
        """The served default model's name and version, as GetModel answers it."""
        with channel_to(self.address) as channel:
            info = pb_grpc.ExplainerStub(channel).GetModel(pb.GetModelRequest(),
                                                           timeout=UNARY_TIMEOUT_S)
        return f"{info.name} (version {info.version[:12]})"

    def envoy_stats(self) -> dict[str, int]:
        """Envoy's retry and reset counters of the replicas' cluster."""
        try:
            text = probes.admin_request(self.admin, "/stats?filter=^cluster\\.camserve\\.")
        except OSError:
            return {}
        wanted = ("upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_retry_overflow",
                  "retry_or_shadow_abandoned", "upstream_cx_connect_fail",
                  "upstream_rq_rx_reset", "upstream_cx_destroy_remote_with_active_rq",
                  "upstream_rq_total", "upstream_rq_pending_failure_eject")
        stats = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            short = name.removeprefix("cluster.camserve.")
            if short in wanted and value.strip().isdigit():
                stats[short] = int(value)
        return stats

    def healthy(self, port: int) -> bool:
        try:
            return bool(probes.host_stats(self.admin, 2).get(f"127.0.0.1:{port}", {})
                        .get("healthy"))
        except (OSError, ValueError):
            return False

    def stop(self) -> tuple[int | None, list[int]]:
        """SIGTERM the cluster and wait; returns its exit code (None: it had to be killed)
        and the pids of children still alive after it exited."""
        children = [m.pid for m in self.members() if m.role != "supervisor"]
        code: int | None = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        else:
            code = self.process.returncode
        time.sleep(1.0)  # the parent-death signal's reach
        left = [pid for pid in children if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        for pid in left:  # ours: never leave them behind
            os.kill(pid, signal.SIGKILL)
        return code, left


# --- kills and samples ---------------------------------------------------------------------------
def killer(cluster: Cluster, recorder: Recorder, victims: list[int], every: float,
           until: float, stop: threading.Event, kills: list[Kill]) -> None:
    """SIGKILL replicas ``victims`` in turn every ``every`` seconds, and time their return."""
    for turn in range(1, int(until / every) + 1):
        at = every * turn
        if at > until - RECOVERY_S or stop.wait(max(0.0, at - recorder.now())):
            return
        index = victims[(turn - 1) % len(victims)]
        member = cluster.replica(index)
        if member is None:
            continue  # not back from an earlier kill (that kill's record says so)
        os.kill(member.pid, signal.SIGKILL)
        kill = Kill(recorder.now(), index, member.pid)
        kills.append(kill)
        print(f"[soak] t={kill.at:.0f}s SIGKILL replica {index} (pid {member.pid})",
              file=sys.stderr, flush=True)
        _time_return(cluster, recorder, kill, member, min(until, kill.at + every), stop)


def _time_return(cluster: Cluster, recorder: Recorder, kill: Kill, old: Member, until: float,
                 stop: threading.Event) -> None:
    """Fill ``kill``'s restart, SERVING and Envoy-healthy times (None: not by ``until``)."""
    while recorder.now() < until and not stop.is_set():
        since = recorder.now() - kill.at
        if kill.new_pid is None:
            new = cluster.replica(kill.replica)
            if new is not None and new.pid != old.pid:
                kill.new_pid, kill.restarted_s = new.pid, since
        elif kill.serving_s is None:
            if probes.health_status(f"127.0.0.1:{old.health_port}", 0.5) == "SERVING":
                kill.serving_s = since
        elif cluster.healthy(old.port):
            kill.healthy_s = since
            return
        time.sleep(0.1)


@dataclass
class Sample:
    """The cluster's processes at ``at`` seconds: name -> {pid, rss_mib, threads, fds,
    cpu_s, in_flight}; the 1-minute load average and this process's CPU seconds."""

    at: float
    processes: dict[str, dict[str, Any]]
    load_1m: float
    soak_cpu_s: float
    calls: int


def sample(cluster: Cluster, recorder: Recorder) -> Sample:
    """One ``Sample`` of every cluster process now running (psutil; metrics for replicas)."""
    processes: dict[str, dict[str, Any]] = {}
    for member in cluster.members():
        try:
            process = psutil.Process(member.pid)
            with process.oneshot():
                cpu = process.cpu_times()
                figures = {"pid": member.pid, "rss_mib": process.memory_info().rss / MIB,
                           "threads": process.num_threads(), "fds": process.num_fds(),
                           "cpu_s": cpu.user + cpu.system}
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if member.role == "replica":
            figures["in_flight"] = cluster.in_flight(member.index)
        processes[member.name] = figures
    own = psutil.Process().cpu_times()
    return Sample(recorder.now(), processes, os.getloadavg()[0], own.user + own.system,
                  recorder.count())


def sampler(cluster: Cluster, recorder: Recorder, every: float, stop: threading.Event,
            samples: list[Sample]) -> None:
    """Append a ``Sample`` every ``every`` seconds until ``stop``."""
    while not stop.is_set():
        samples.append(sample(cluster, recorder))
        stop.wait(every)


# --- analysis ------------------------------------------------------------------------------------
def classify(outcome: Outcome, kills: list[Kill]) -> str:
    """"expected", "kill" (a loss a SIGKILL may cause) or "unexpected"."""
    if outcome.code in EXPECTED[outcome.kind] and not outcome.broken:
        return "expected"
    if outcome.kind in KILL_LOSS_KINDS and outcome.code in KILL_CODES and any(
            outcome.started <= k.at <= outcome.ended <= k.at + KILL_WINDOW_S for k in kills):
        return "kill"
    return "unexpected"


def _since_kill(outcome: Outcome, kills: list[Kill]) -> float | None:
    """Seconds from the last kill before ``outcome`` ended to its end (None: no kill yet)."""
    before = [k.at for k in kills if k.at <= outcome.ended]
    return outcome.ended - max(before) if before else None


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def kind_table(outcomes: list[Outcome], kills: list[Kill]) -> dict[str, dict[str, Any]]:
    """Per kind: calls, answered as expected, lost to kills, unexpected (by code), and the
    latency (ms) median and p99 of the calls answered as expected."""
    table: dict[str, dict[str, Any]] = {}
    for kind in [*UNARY_MIX, *STREAM_MIX]:
        mine = [o for o in outcomes if o.kind == kind]
        verdicts = [classify(o, kills) for o in mine]
        latencies = [o.latency_ms for o, v in zip(mine, verdicts) if v == "expected"]
        table[kind] = {
            "calls": len(mine),
            "codes": dict(Counter(o.code for o in mine)),
            "expected": verdicts.count("expected"),
            "lost_to_kills": verdicts.count("kill"),
            "unexpected": dict(Counter(o.code + (" (broken)" if o.broken else "")
                                       for o, v in zip(mine, verdicts) if v == "unexpected")),
            "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99)}
    return table


def _window(samples: list[Sample], name: str, span: tuple[float, float], length: float,
            pid: int) -> list[dict[str, Any]]:
    return [s.processes[name] for s in samples
            if span[0] * length <= s.at <= span[1] * length and name in s.processes
            and s.processes[name]["pid"] == pid]


def leak_checks(samples: list[Sample], length: float, spared: int) -> list[dict[str, Any]]:
    """For each process that lived through the run: baseline and end medians of RSS, threads
    and fds, the growth and whether it stays within ``LEAK_BOUNDS``."""
    checks = []
    names = [f"replica {i}" for i in range(spared)] + ["envoy", "supervisor"]
    for name in names:
        role = name.split()[0]
        pids = {s.processes[name]["pid"] for s in samples if name in s.processes}
        check: dict[str, Any] = {"process": name, "pids": sorted(pids)}
        if len(pids) != 1:
            check["problem"] = f"expected one process all run long, saw pids {sorted(pids)}"
            checks.append(check)
            continue
        pid = pids.pop()
        base = _window(samples, name, BASELINE_WINDOW, length, pid)
        end = _window(samples, name, END_WINDOW, length, pid)
        if not base or not end:
            check["problem"] = "too few samples (run longer or sample more often)"
            checks.append(check)
            continue
        mib, fraction, threads, fds = LEAK_BOUNDS[role]
        over = []
        for key, bound in (("rss_mib", None), ("threads", threads), ("fds", fds)):
            before = statistics.median(f[key] for f in base)
            after = statistics.median(f[key] for f in end)
            limit = max(mib, fraction * before) if bound is None else bound
            check[key] = {"baseline": before, "end": after, "growth": after - before,
                          "bound": limit}
            if after - before > limit:
                over.append(f"{key} +{after - before:.0f} > +{limit:.0f}")
        check["problem"] = "; ".join(over)
        checks.append(check)
    return checks


def deaths(samples: list[Sample], kills: list[Kill]) -> list[dict[str, Any]]:
    """Each killed process's last sampled figures (what it had grown to when it died)."""
    found = []
    for kill in kills:
        name = f"replica {kill.replica}"
        last = [s for s in samples if s.at <= kill.at and name in s.processes
                and s.processes[name]["pid"] == kill.pid]
        first = [s for s in samples if name in s.processes and s.processes[name]["pid"] == kill.pid]
        if last:
            found.append({"replica": kill.replica, "pid": kill.pid,
                          "lived_s": kill.at - first[0].at, **last[-1].processes[name]})
    return found


def end_checks(cluster: Cluster, payloads: Payloads) -> dict[str, Any]:
    """After the load stopped: every replica's in-flight gauge back to 0 (within 10 s),
    health SERVING through Envoy, Envoy counting every replica healthy, and one normal call
    answered."""
    deadline = time.monotonic() + 10.0
    while True:
        in_flight = {i: cluster.in_flight(i) for i in range(cluster.replicas)}
        if all(v == 0 for v in in_flight.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    health = probes.health_status(cluster.address, 5.0)
    members = [m for m in cluster.members() if m.role == "replica"]
    healthy = sum(cluster.healthy(m.port) for m in members if m.port)
    with channel_to(cluster.address) as channel:
        try:
            pb_grpc.ExplainerStub(channel).Explain(payloads.small, timeout=UNARY_TIMEOUT_S)
            last_call = "OK"
        except grpc.RpcError as error:
            last_call = _code(error)[0]
    return {"in_flight": in_flight, "health_through_envoy": health,
            "replicas_running": len(members), "envoy_healthy": healthy, "last_call": last_call}


def verdict(table: dict[str, dict[str, Any]], kills: list[Kill], leaks: list[dict[str, Any]],
            end: dict[str, Any], victims: int) -> tuple[bool, list[str]]:
    """PASS or FAIL and why."""
    reasons = []
    unexpected = {kind: row["unexpected"] for kind, row in table.items() if row["unexpected"]}
    if unexpected:
        reasons.append(f"unexpected failures {unexpected}")
    if not table["unary"]["expected"] or not table["stream"]["expected"]:
        reasons.append("no normal unary call or stream succeeded")
    slow = [k for k in kills if k.healthy_s is None]
    if slow:
        reasons.append(f"{len(slow)} killed replica(s) not back healthy before the next kill")
    if victims and not kills:
        reasons.append(f"no replica was killed (run longer than --kill-every + {RECOVERY_S:g} s)")
    reasons += [f"{c['process']}: {c['problem']}" for c in leaks if c.get("problem")]
    if any(v != 0 for v in end["in_flight"].values()):
        reasons.append(f"calls left in flight after the load stopped: {end['in_flight']}")
    if end["health_through_envoy"] != "SERVING" or end["last_call"] != "OK":
        reasons.append(f"after the run: health {end['health_through_envoy']}, a call "
                       f"{end['last_call']}")
    if end.get("exit_code") != 0 or end.get("children_left"):
        reasons.append(f"cluster stop: exit {end.get('exit_code')}, children left "
                       f"{end.get('children_left')}")
    return not reasons, reasons


# --- the report ----------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(result: dict[str, Any]) -> str:
    """The text report of ``result`` (the JSON's content)."""
    run, load, table = result["run"], result["load"], result["kinds"]
    spared = ", ".join(f"replica {i}" for i in range(run["spared"])) or "none"
    lines = [
        (f"camserve soak: {run['minutes']:g} min against `camserve cluster` "
         f"({run['replicas']} replicas, --device cpu --intra-op-threads "
         f"{run['intra_op_threads']}) behind Envoy; model {run['model']}"),
        (f"kills: SIGKILL every {run['kill_every_s']:g} s to replicas {run['victims']} in "
         f"turn; never killed: {spared}"),
        (f"load: {run['unary_clients']} unary + {run['stream_clients']} stream clients, "
         f"closed loop, client retries off; {load['cpus']} CPUs, 1-min load average mean "
         f"{load['load_mean']:.1f} (max {load['load_max']:.1f}); CPU seconds: replicas "
         f"{load['cpu_replicas_s']:.0f}, envoy {load['cpu_envoy_s']:.0f}, this process "
         f"{load['cpu_soak_s']:.0f} (of {load['cpus'] * run['minutes'] * 60:.0f} on the "
         "machine, shared)"),
        (f"calls: {load['calls']} ({load['calls_per_s']:.1f}/s); refused as expected "
         f"(malformed): {load['refused']} ({load['refused_share']:.1%}); cancelled or "
         f"expired as asked: {load['cancelled']}; lost to kills: {load['lost_to_kills']}; "
         f"unexpected: {load['unexpected']}"), "",
        "latency of the calls answered as expected (streams: the whole stream)",
        (f"{'kind':<18}{'calls':>7}{'expected':>10}{'kill':>6}{'unexp.':>8}{'p50 ms':>8}"
         f"{'p99 ms':>8}  codes")]
    for kind, row in table.items():
        codes = ", ".join(f"{c} {n}" for c, n in sorted(row["codes"].items()))
        lines.append(f"{kind:<18}{row['calls']:>7}{row['expected']:>10}"
                     f"{row['lost_to_kills']:>6}{sum(row['unexpected'].values()):>8}"
                     f"{_ms(row['p50_ms']):>8}{_ms(row['p99_ms']):>8}  {codes}")
    for kind, frames in result["frames"].items():
        lines.append(f"frames of {kind}: {frames['explained']} explained, p50 "
                     f"{_ms(frames['p50_ms'])} ms, p99 {_ms(frames['p99_ms'])} ms (offered -> "
                     f"answered), {frames['skipped']} skipped")
    if result["failures"]:
        lines += ["", "unexpected failures (first 10):"]
        lines += [f"  t={f['started']:.1f}-{f['ended']:.1f}s {f['kind']} {f['code']} "
                  f"{f['broken'] or f['detail']} ({_after_kill(f['since_kill'])})"
                  for f in result["failures"][:10]]
    if result["kill_losses"]:
        lines += ["", "lost to kills (allowed: KILL_CODES within KILL_WINDOW_S of a kill):"]
        lines += [f"  t={f['started']:.1f}-{f['ended']:.1f}s {f['kind']} {f['code']} "
                  f"{f['detail']}" for f in result["kill_losses"][:10]]
    lines += ["", f"kills: {len(result['kills'])}; Envoy stats: {result['envoy']}"]
    for k in result["kills"]:
        lines.append(f"  t={k['at']:.0f}s replica {k['replica']} pid {k['pid']} -> pid "
                     f"{k['new_pid']}: restarted {_s(k['restarted_s'])}, SERVING "
                     f"{_s(k['serving_s'])}, healthy in Envoy {_s(k['healthy_s'])}")
    for d in result["deaths"]:
        lines.append(f"  replica {d['replica']} pid {d['pid']} at death: lived "
                     f"{d['lived_s']:.0f} s, RSS {d['rss_mib']:.0f} MiB, {d['threads']} "
                     f"threads, {d['fds']} fds")
    lines += ["", "per process over time: RSS MiB / threads / fds (in flight)"]
    names = [f"replica {i}" for i in range(run["replicas"])] + ["envoy", "supervisor"]
    lines.append(f"{'t s':>6}  " + "".join(f"{n:<19}" for n in names) + "calls/s  load")
    samples = result["samples"]
    step = max(1, len(samples) // 24)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    previous: dict[str, Any] | None = None
    for s in shown:
        cells = []
        for name in names:
            p = s["processes"].get(name)
            if p is None:
                cells.append(f"{'(down)':<19}")
                continue
            flight = "" if p.get("in_flight") is None else f" ({p['in_flight']:.0f})"
            cells.append(f"{p['rss_mib']:.0f}/{p['threads']}/{p['fds']}{flight}".ljust(19))
        rate = "" if previous is None else (
            f"{(s['calls'] - previous['calls']) / max(1e-9, s['at'] - previous['at']):.1f}")
        lines.append(f"{s['at']:>6.0f}  " + "".join(cells) + f"{rate:>7}  {s['load_1m']:.1f}")
        previous = s
    lines += ["", (f"leak check (median of samples at {END_WINDOW[0]:.0%}-{END_WINDOW[1]:.0%} "
                   f"of the run vs {BASELINE_WINDOW[0]:.0%}-{BASELINE_WINDOW[1]:.0%}):")]
    for c in result["leaks"]:
        if "rss_mib" not in c:
            lines.append(f"  {c['process']}: {c['problem']}")
            continue
        parts = [f"{key} {c[key]['baseline']:.0f} -> {c[key]['end']:.0f} (bound "
                 f"+{c[key]['bound']:.0f})" for key in ("rss_mib", "threads", "fds")]
        lines.append(f"  {c['process']} (pid {c['pids'][0]}): " + ", ".join(parts)
                     + (f"  OVER: {c['problem']}" if c["problem"] else "  ok"))
    end = result["end"]
    lines += ["", (f"end: in flight {end['in_flight']}; health through Envoy "
                   f"{end['health_through_envoy']}; Envoy healthy replicas "
                   f"{end['envoy_healthy']}/{end['replicas_running']}; a last call "
                   f"{end['last_call']}; SIGTERM: exit {end.get('exit_code')}, children left "
                   f"{end.get('children_left')}; cluster log: {end.get('log_errors')}")]
    ok, reasons = result["verdict"]["pass"], result["verdict"]["reasons"]
    lines.append("VERDICT: " + ("PASS" if ok else "FAIL") + (
        f" ({'; '.join(reasons)})" if reasons else
        f" (no unexpected failure in {load['calls']} calls, {len(result['kills'])} kills, "
        "no growth beyond the leak bounds, clean stop)"))
    return "\n".join(lines)


def _after_kill(seconds: float | None) -> str:
    return "no kill before it" if seconds is None else f"{seconds:.1f} s after a kill"


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def log_errors(log: Path) -> dict[str, int]:
    """The ERROR lines of the cluster's output, counted by message (grpcio logs one for each
    request that is no protobuf: "Exception deserializing message!")."""
    found: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        _, marker, message = line.partition(" ERROR ")
        if marker:
            found[message.strip()[:120]] += 1
    return dict(found)


# --- main ----------------------------------------------------------------------------------------
def _threads(targets: list[Callable[[], None]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    return threads


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak as ``args`` say; returns the result (what the report and JSON show)."""
    if not any(args.models.glob("*.onnx")):
        sys.exit(f"soak: no model in {args.models}: run `make export` first")
    payloads = build_payloads()
    length = args.minutes * 60.0
    victims = list(range(args.spared, args.replicas))
    with tempfile.TemporaryDirectory(prefix="camserve-soak-") as workdir:
        log = args.cluster_log or Path(workdir) / "cluster.log"
        cluster = Cluster(args.models, args.replicas, args.intra_op_threads, log)
        end: dict[str, Any] = {}
        try:
            cluster.wait_serving(START_TIMEOUT_S)
            model = cluster.default_model()
            print(f"[soak] cluster serving on {cluster.address}; {args.minutes:g} min of "
                  "traffic", file=sys.stderr, flush=True)
            recorder = Recorder(time.monotonic())
            stop_load, stop_watch = threading.Event(), threading.Event()
            kills: list[Kill] = []
            samples: list[Sample] = []
            references = reference_classes(cluster.address, payloads)
            clients = [UnaryClient(cluster.address, payloads, recorder, args.seed + i,
                                   references).run for i in range(args.unary_clients)]
            clients += [StreamClient(cluster.address, payloads, recorder, args.seed + 100 + i).run
                        for i in range(args.stream_clients)]
            load = _threads([lambda run=run: run(stop_load) for run in clients])
            watchers = _threads([
                lambda: sampler(cluster, recorder, args.sample_every, stop_watch, samples),
                lambda: killer(cluster, recorder, victims, args.kill_every, length, stop_watch,
                               kills) if victims else None])
            while recorder.now() < length:
                time.sleep(min(60.0, max(0.0, length - recorder.now())))
                outcomes = recorder.snapshot()
                print(f"[soak] t={recorder.now():.0f}s calls {len(outcomes)}, unexpected "
                      f"{sum(classify(o, kills) == 'unexpected' for o in outcomes)}, kills "
                      f"{len(kills)}", file=sys.stderr, flush=True)
            stop_load.set()
            for thread in load:
                thread.join(STREAM_TIMEOUT_S)
            stop_watch.set()
            for thread in watchers:
                thread.join(30)
            end = end_checks(cluster, payloads)
            envoy = cluster.envoy_stats()
        finally:
            end["exit_code"], end["children_left"] = cluster.stop()
        end["log_errors"] = log_errors(log)
    outcomes = recorder.snapshot()
    table = kind_table(outcomes, kills)
    leaks = leak_checks(samples, length, args.spared)
    ok, reasons = verdict(table, kills, leaks, end, len(victims))
    verdicts = [classify(o, kills) for o in outcomes]
    first, last = samples[0], samples[-1]

    def cpu(role: str) -> float:  # CPU seconds used over the run, restarts included
        used: dict[int, float] = {}
        for s in samples:
            for name, p in s.processes.items():
                if name.startswith(role):
                    used[p["pid"]] = p["cpu_s"]
        return sum(used.values()) - sum(p["cpu_s"] for name, p in first.processes.items()
                                        if name.startswith(role))

    loads = [s.load_1m for s in samples]
    frames = {kind: {"explained": len(ms), "p50_ms": _percentile(ms, 50),
                     "p99_ms": _percentile(ms, 99), "skipped": recorder.skipped[kind]}
              for kind, ms in recorder.frame_ms.items()}
    return {
        "run": {"minutes": args.minutes, "replicas": args.replicas, "spared": args.spared,
                "victims": victims, "kill_every_s": args.kill_every,
                "sample_every_s": args.sample_every, "unary_clients": args.unary_clients,
                "stream_clients": args.stream_clients,
                "intra_op_threads": args.intra_op_threads, "model": model,
                "seed": args.seed},
        "load": {"cpus": os.cpu_count(), "load_mean": statistics.fmean(loads),
                 "load_max": max(loads), "calls": len(outcomes),
                 "calls_per_s": len(outcomes) / max(1e-9, last.at),
                 "refused": sum(o.kind in MALFORMED and v == "expected"
                                for o, v in zip(outcomes, verdicts)),
                 "refused_share": sum(o.kind in MALFORMED for o in outcomes)
                 / max(1, len(outcomes)),
                 "cancelled": sum(o.kind in CANCELLATIONS and o.code != "OK"
                                  and v == "expected" for o, v in zip(outcomes, verdicts)),
                 "lost_to_kills": verdicts.count("kill"),
                 "unexpected": verdicts.count("unexpected"),
                 "cpu_replicas_s": cpu("replica"), "cpu_envoy_s": cpu("envoy"),
                 "cpu_soak_s": last.soak_cpu_s - first.soak_cpu_s},
        "kinds": table, "frames": frames,
        "failures": [{**asdict(o), "since_kill": _since_kill(o, kills)}
                     for o, v in zip(outcomes, verdicts) if v == "unexpected"][:100],
        "kill_losses": [asdict(o) for o, v in zip(outcomes, verdicts) if v == "kill"],
        "kills": [asdict(k) for k in kills], "deaths": deaths(samples, kills),
        "envoy": envoy, "samples": [asdict(s) for s in samples], "leaks": leaks, "end": end,
        "verdict": {"pass": ok, "reasons": reasons},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=MINUTES,
                        help=f"length of the traffic (default {MINUTES:g})")
    parser.add_argument("--kill-every", type=float, default=KILL_EVERY_S, metavar="S",
                        help=f"seconds between two SIGKILLs (default {KILL_EVERY_S:g})")
    parser.add_argument("--models", type=Path, default=ROOT / "models",
                        help="models folder the replicas serve (default: models, `make export`)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the result here")
    parser.add_argument("--replicas", type=int, default=REPLICAS)
    parser.add_argument("--spared", type=int, default=SPARED,
                        help=f"replicas never killed, the leak witnesses (default {SPARED})")
    parser.add_argument("--unary-clients", type=int, default=UNARY_CLIENTS)
    parser.add_argument("--stream-clients", type=int, default=STREAM_CLIENTS)
    parser.add_argument("--intra-op-threads", type=int, default=INTRA_OP_THREADS,
                        help=f"onnxruntime threads per replica (default {INTRA_OP_THREADS})")
    parser.add_argument("--sample-every", type=float, default=SAMPLE_EVERY_S, metavar="S")
    parser.add_argument("--seed", type=int, default=0, help="the traffic mix's random seed")
    parser.add_argument("--cluster-log", type=Path, metavar="FILE",
                        help="keep the cluster's output here (default: a temporary file)")
    args = parser.parse_args()
    if not 0 <= args.spared < args.replicas:
        parser.error("--spared must be >= 0 and below --replicas (someone must be killed, and "
                     "someone must serve)")
    if args.minutes <= 0 or args.kill_every <= 0 or args.sample_every <= 0:
        parser.error("--minutes, --kill-every and --sample-every must be > 0")
    result = soak(args)
    print(report(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    sys.exit(0 if result["verdict"]["pass"] else 1)


if __name__ == "__main__":
    main()
