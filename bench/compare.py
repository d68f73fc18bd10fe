"""What a Grad-CAM explanation costs: camserve side by side with the PyTorch libraries.

``make bench`` (or ``.venv/bin/python bench/compare.py [--quick]``). For each model
(resnet50 with random weights -- timing does not depend on them -- and the pretrained
EfficientNet-Lite0), on the CPU (``--device cuda``: on the GPU, see below), B=1, 224x224,
with the same thread count everywhere (onnxruntime intra-op threads = torch threads =
--threads):

  (a) onnxruntime forward of the plain classifier (torch.onnx.export, dynamo=False)
  (b) the explainer graph in-process, Grad-CAM included (session run + cam_maps to 224x224)
  (c) camserve over gRPC on loopback, server in a subprocess: the SDK default
      (Client.explain, MODEL_INPUT float16 map) and the smallest response (raw stub call,
      FEATURE_MAP float16)
  (d) grad-cam 1.5.7 GradCAM on torch, ClassifierOutputTarget(top class)
  (e) Captum LayerGradCam on torch, upsampled with LayerAttribution.interpolate

(d) and (e) explain the layer camserve exports by default (resnet50: layer4, Lite0: _bn1).
(e) is left out, with a note, where Captum is not installed.

``--device cuda`` runs (a) and (b) on onnxruntime's CUDA provider (the explainer through IO
binding, as the server runs it on CUDA; with one more row, (b) without IO binding), the
servers with ``--device cuda``, and (d) and (e) with the model and input on the GPU.
``--precision float32 float16`` measures each model once per precision: the explainer and
the plain classifier of (a) exported in that precision (``camserve export --precision``),
(d) and (e) always in float32 on torch.
Every request sends the same JPEG: samples/cat.jpg resized to 224x224 and re-encoded
(quality 90), so the server decodes and preprocesses an image of the model's input size;
(a), (b), (d) and (e) get the tensor the server's preprocessing makes of it.

The methods run round-robin (each round in a new random order) after a warm-up, so all see
the same machine state (the servers of every mode are up meanwhile, idle unless called); the
tables give medians. Then, per server mode (dynamic batching on and off, when
``camserve serve`` has --no-batching): throughput with 1, 4 and 16 concurrent client threads
(each with its own Client, SDK default requests, a fixed duration per level), the server's
RSS after warm-up and after the load, and the response sizes.

Writes bench/results/bench.md (the tables, also printed) and bench/results/bench.json (every
number, raw timings included).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import psutil
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from camserve.client import Client
from camserve import contract
from camserve.export import export_explainer
from camserve.export.models import load
from camserve.export.precision import to_float16
from camserve.explain import methods
from camserve.explain.image import decode, preprocess
from camserve.server.runtime import load_model, open_session
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "cat.jpg"
SIZE = 224
JPEG_QUALITY = 90
TIMEOUT_S = 60.0
SERVER_START_S = 300.0

Call = Callable[[], object]

# what each measurement is, in the order of the latency table (c's keys get "/<server mode>")
LABELS = {
    "a": "(a) onnxruntime forward, plain classifier",
    "b": "(b) explainer graph + Grad-CAM, in-process",
    "b_unbound": "(b) explainer graph + Grad-CAM, in-process, without IO binding",
    "c_sdk": "(c) gRPC, SDK default (Client.explain, MODEL_INPUT float16)",
    "c_min": "(c) gRPC, smallest response (stub, FEATURE_MAP float16)",
    "d": "(d) grad-cam 1.5.7 GradCAM, torch",
    "e": "(e) Captum LayerGradCam + interpolate, torch",
}
STAGES = ("decode", "preprocess", "inference", "postprocess")  # the server's Timings
# response sizes: (space for Client.request, map dtype)
RESPONSES = {
    "feature_map_float16": ("feature_map", pb.FLOAT16),
    "model_input_float16": ("model_input", pb.FLOAT16),
    "model_input_float32": ("model_input", pb.FLOAT32),
}


@dataclass(frozen=True)
class Settings:
    device: str  # "cpu" or "cuda": onnxruntime's provider, the servers' and torch's device
    threads: int
    runs: int
    warmup: int
    seconds: float  # per throughput level
    clients: tuple[int, ...]


@dataclass
class Subject:
    """One model in one precision, exported both ways, and its input."""

    arch: str
    precision: str  # of the two ONNX files; torch runs float32
    module: torch.nn.Module
    layer: str  # the layer camserve explains by default
    plain: Path  # plain classifier ONNX
    models_dir: Path  # holds only this model's explainer: the server's --models
    image: np.ndarray  # float32 [1,3,224,224], as the server preprocesses the JPEG


# --- timing -------------------------------------------------------------------------------
_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:5.0f} s] {message}", flush=True)


def time_round_robin(calls: dict[str, Call], runs: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call: every round runs each call once, in a fresh (seeded) random
    order, so that no call always follows the same one (thread pools of onnxruntime, torch
    and OpenCV keep spinning for a while after a call, slowing whatever comes next)."""
    names, order = list(calls), random.Random(0)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(runs):
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summary(samples: list[float]) -> dict[str, Any]:
    deciles = (statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1
               else samples * 9)
    return {"median": statistics.median(samples), "p10": deciles[0], "p90": deciles[-1],
            "samples": [round(s, 3) for s in samples]}


# --- models -------------------------------------------------------------------------------
def sample_jpeg() -> bytes:
    photo = cv2.imread(str(SAMPLE), cv2.IMREAD_COLOR)
    small = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok, "OpenCV could not encode the sample"
    return data.tobytes()


def prepare(arch: str, folder: Path, jpeg: bytes,
            precision: str = contract.FLOAT32) -> Subject:
    """Export ``arch`` as a plain classifier and as an explainer (the default layer), both
    in ``precision``."""
    loaded = load(arch)  # resnet50: torchvision.models.resnet50(weights=None)
    module = loaded.module.eval()
    tag = arch if precision == contract.FLOAT32 else f"{arch}-{precision}"
    models_dir = folder / tag
    models_dir.mkdir()
    result = export_explainer(module, models_dir / f"{arch}.onnx", input_size=SIZE,
                              labels=loaded.labels, preprocess=loaded.preprocessing,
                              architecture=arch, precision=precision)
    plain = folder / f"{tag}_plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, SIZE, SIZE),), str(plain), dynamo=False,
                          input_names=["image"], output_names=["logits"], opset_version=17)
    if precision == contract.FLOAT16:
        onnx.save(to_float16(onnx.load(str(plain))), str(plain))
    image, _ = preprocess(decode(jpeg), loaded.preprocessing)
    return Subject(arch, precision, module, result.card.layers[0].name, plain, models_dir,
                   image)


def subject_name(s: Subject) -> str:
    """The model's row label: the architecture, and the precision unless float32."""
    return s.arch if s.precision == contract.FLOAT32 else f"{s.arch} {s.precision}"


def onnx_calls(s: Subject, threads: int, device: str = "cpu") -> dict[str, Call]:
    """(a) and (b), on sessions made exactly as the server makes them; on CUDA also (b)
    without IO binding."""
    plain, _ = open_session(s.plain, device, threads)
    path = s.models_dir / f"{s.arch}.onnx"
    explainers = {"b": load_model(path, device, threads)}
    if device == "cuda":
        explainers["b_unbound"] = load_model(path, device, threads, io_binding=False)
    targets = np.full((1, 1), -1, np.int64)  # the predicted class

    def forward() -> object:
        return plain.run(None, {"image": s.image})

    def explain(explainer) -> Call:
        def call() -> object:
            _, _, per_layer = explainer.run(s.image, targets, [s.layer])
            return methods.cam_maps("gradcam", [(a[0], g[0]) for a, g in per_layer.values()],
                                (SIZE, SIZE))
        return call

    return {"a": forward} | {key: explain(model) for key, model in explainers.items()}


def torch_calls(s: Subject, device: str = "cpu") -> dict[str, Call]:
    """(d) and (e) for the predicted class, on the same layer and input, on ``device``
    (each returns a host array or tensor, so a GPU call has finished when it returns);
    (e) only where Captum is installed."""
    module = s.module.to(device)
    x = torch.from_numpy(s.image).to(device)
    with torch.no_grad():
        top = int(module(x).argmax())
    layer = module.get_submodule(s.layer)
    targets = [ClassifierOutputTarget(top)]

    def grad_cam() -> object:
        with GradCAM(model=module, target_layers=[layer]) as method:  # hooks off after
            return method(input_tensor=x, targets=targets)

    calls: dict[str, Call] = {"d": grad_cam}
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        return calls
    captum = LayerGradCam(module, layer)

    def captum_cam() -> object:
        return LayerAttribution.interpolate(captum.attribute(x, target=top), (SIZE, SIZE),
                                            "bilinear").cpu()

    return calls | {"e": captum_cam}


# --- the server ---------------------------------------------------------------------------
def server_modes() -> tuple[dict[str, list[str]], list[str]]:
    """Server modes to compare (name -> extra `camserve serve` flags), and notes."""
    text = subprocess.run([sys.executable, "-m", "camserve", "serve", "--help"],
                          capture_output=True, text=True, check=True).stdout
    if "--no-batching" in text:
        return {"batching": [], "no-batching": ["--no-batching"]}, []
    return {"default": []}, ["`camserve serve` has no --no-batching flag yet: one server mode "
                             "only (no dynamic batching)"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`camserve serve` in a subprocess, healthy once the constructor returns."""

    def __init__(self, models_dir: Path, threads: int, flags: list[str], log: Path,
                 device: str = "cpu") -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log = log
        command = [sys.executable, "-m", "camserve", "serve", "--models", str(models_dir),
                   "--port", self.address.rsplit(":", 1)[1], "--device", device,
                   "--intra-op-threads", str(threads), *flags]
        with log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        with Client(self.address, timeout=2) as client:
            if client.wait_until_serving(SERVER_START_S, lambda: self.process.poll() is None):
                return
        raise RuntimeError(f"the server did not become healthy (exit code "
                           f"{self.process.poll()}): {self.log.read_text()[-2000:]}")

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def request(jpeg: bytes, arch: str, space: str, dtype: int) -> pb.ExplainRequest:
    """The SDK's request for the predicted class, with the map in ``space`` and ``dtype``."""
    message = Client.request(jpeg, model=arch, space=space)
    message.output.dtype = dtype
    return message


class Endpoint:
    """A connection to a server: the SDK client and a raw stub on a channel of its own."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, timeout=TIMEOUT_S)
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.ExplainerStub(self.channel)
        self.timings: list[pb.Timings] = []  # server stage timings of the raw calls

    def calls(self, jpeg: bytes, arch: str) -> dict[str, Call]:
        smallest = request(jpeg, arch, *RESPONSES["feature_map_float16"])

        def sdk() -> object:
            return self.client.explain(jpeg, model=arch)

        def raw() -> object:
            response = self.stub.Explain(smallest, timeout=TIMEOUT_S)
            self.timings.append(response.timings)
            return response

        return {"c_sdk": sdk, "c_min": raw}

    def response_bytes(self, jpeg: bytes, arch: str) -> dict[str, int]:
        return {name: self.stub.Explain(request(jpeg, arch, space, dtype),
                                        timeout=TIMEOUT_S).ByteSize()
                for name, (space, dtype) in RESPONSES.items()}

    def close(self) -> None:
        self.client.close()
        self.channel.close()


def stages_ms(timings: list[pb.Timings], elapsed_ms: list[float]) -> dict[str, float]:
    """Medians (ms) of the server's stages in the timed raw calls, and of the rest of each
    call (gRPC, protobuf, the client): its elapsed time less the server's stages."""
    server = [[getattr(t, f"{stage}_us") / 1e3 for stage in STAGES]
              for t in timings[-len(elapsed_ms):]]  # the warm-up calls came first
    columns = {stage: [row[i] for row in server] for i, stage in enumerate(STAGES)}
    columns["rest"] = [elapsed - sum(row) for elapsed, row in zip(elapsed_ms, server)]
    return {name: statistics.median(values) for name, values in columns.items()}


def throughput(address: str, jpeg: bytes, arch: str, clients: int, seconds: float) -> float:
    """Explanations/s: ``clients`` threads, each with its own Client, for ``seconds``."""
    window: dict[str, float] = {}
    gate = threading.Barrier(clients, action=lambda: window.update(start=time.perf_counter()),
                             timeout=TIMEOUT_S)

    def worker() -> tuple[int, float]:
        with Client(address, timeout=TIMEOUT_S) as client:
            client.explain(jpeg, model=arch)  # connected and warm before the clock starts
            gate.wait()
            end, done = window["start"] + seconds, 0
            while time.perf_counter() < end:
                client.explain(jpeg, model=arch)
                done += 1
            return done, time.perf_counter()

    with ThreadPoolExecutor(clients) as pool:
        results = [f.result() for f in [pool.submit(worker) for _ in range(clients)]]
    return sum(n for n, _ in results) / (max(t for _, t in results) - window["start"])


def start_servers(s: Subject, settings: Settings, modes: dict[str, list[str]], scratch: Path,
                  stack: ExitStack, notes: list[str]) -> dict[str, Server]:
    """One server per mode (stopped by ``stack``); a mode that fails to start is noted."""
    servers = {}
    for mode, flags in modes.items():
        log = scratch / f"{s.models_dir.name}-{mode}.log"
        try:
            servers[mode] = Server(s.models_dir, settings.threads, flags, log, settings.device)
        except RuntimeError as exc:
            notes.append(f"{subject_name(s)}: server mode {mode!r} failed to start: {exc}")
            continue
        stack.callback(servers[mode].stop)
    return servers


def measure(s: Subject, settings: Settings, modes: dict[str, list[str]], jpeg: bytes,
            scratch: Path, notes: list[str]) -> dict[str, Any]:
    """Everything for one model: the latency rounds (the servers of every mode up at once,
    idle unless called), then per server mode throughput, RSS and response sizes."""
    with ExitStack() as stack:
        servers = start_servers(s, settings, modes, scratch, stack, notes)
        rss_warm = {mode: server.rss_mib() for mode, server in servers.items()}
        endpoints = {mode: Endpoint(server.address) for mode, server in servers.items()}
        for endpoint in endpoints.values():
            stack.callback(endpoint.close)
        calls = onnx_calls(s, settings.threads, settings.device)
        for mode, endpoint in endpoints.items():
            calls |= {f"{key}/{mode}": call for key, call in endpoint.calls(jpeg, s.arch).items()}
        calls |= torch_calls(s, settings.device)
        progress(f"{subject_name(s)}: timing {len(calls)} methods x {settings.runs} runs")
        times = time_round_robin(calls, settings.runs, settings.warmup)
        latency = {key: summary(samples) for key, samples in times.items()}
        per_mode = {}
        for mode, server in servers.items():
            progress(f"{subject_name(s)}: throughput, server {mode}")
            per_mode[mode] = {
                "explanations_per_s": {n: throughput(server.address, jpeg, s.arch, n,
                                                     settings.seconds)
                                       for n in settings.clients},
                "rss_mib_after_warmup": rss_warm[mode], "rss_mib_after_load": server.rss_mib(),
                "c_min_stages_ms": stages_ms(endpoints[mode].timings, times[f"c_min/{mode}"]),
                "response_bytes": endpoints[mode].response_bytes(jpeg, s.arch),
                "goals": goals(latency, mode)}
    return {"arch": s.arch, "precision": s.precision, "layer": s.layer,
            "latency_ms": latency, "servers": per_mode}


# --- the report ---------------------------------------------------------------------------
GOALS = {  # name: (column title, met?)
    "b/a": ("(b)/(a) ≤ 1.10", lambda v: v <= 1.10),
    "c-b_ms": ("(c)−(b) ms ≤ 3", lambda v: v <= 3),
    "c_min-b_ms": ("(c smallest)−(b) ms ≤ 3", lambda v: v <= 3),
    "d/c": ("(d)/(c) ≥ 5", lambda v: v >= 5),
    "e/c": ("(e)/(c) ≥ 5", lambda v: v >= 5),
}


def goals(latency_ms: dict[str, Any], mode: str) -> dict[str, float]:
    """The goal ratios against server ``mode``; (c) is the SDK default. (e/c without (e):
    NaN.)"""
    ms = {k: v["median"] for k, v in latency_ms.items()}
    c, c_min = ms[f"c_sdk/{mode}"], ms[f"c_min/{mode}"]
    return {"b/a": ms["b"] / ms["a"], "c-b_ms": c - ms["b"], "c_min-b_ms": c_min - ms["b"],
            "d/c": ms["d"] / c, "e/c": ms.get("e", float("nan")) / c}


def fmt(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}"


def mark(text: str, ok: bool) -> str:
    return "–" if text == "nan" else f"{text} {'✓' if ok else '✗'}"


def table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def per_server(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(model, server mode, that server's numbers) for every server measured."""
    return [(arch, mode, m) for arch, r in results.items() for mode, m in r["servers"].items()]


def latency_table(results: dict[str, Any]) -> list[str]:
    def label(key: str) -> str:
        base, _, mode = key.partition("/")
        return LABELS[base] + (f", server {mode}" if mode else "")

    return table("Latency (ms; images/s = 1000 / median, one image per call)",
                 ["model", "measurement", "median", "p10", "p90", "images/s"], [
        [arch, label(key), fmt(v["median"]), fmt(v["p10"]), fmt(v["p90"]),
         f"{1e3 / v['median']:.1f}"]
        for arch, r in results.items() for key, v in r["latency_ms"].items()])


def goals_table(results: dict[str, Any]) -> list[str]:
    return table("Goals ((c) = SDK default)",
                 ["model", "server", *(title for title, _ in GOALS.values())],
                 [[arch, mode, *(mark(fmt(m["goals"][k]), met(m["goals"][k]))
                                 for k, (_, met) in GOALS.items())]
                  for arch, mode, m in per_server(results)])


def stages_table(results: dict[str, Any]) -> list[str]:
    rows = [[arch, mode, *(fmt(v) for v in m["c_min_stages_ms"].values())]
            for arch, mode, m in per_server(results)]
    return table("Where (c) goes (smallest response, ms; server stages from the response's "
                 "timings, inference includes any wait in the batching queue)",
                 ["model", "server", "decode", "preprocess", "inference", "postprocess",
                  "rest: gRPC, protobuf, client"], rows)


def throughput_table(results: dict[str, Any], settings: Settings) -> list[str]:
    return table(f"Throughput over gRPC (explanations/s, SDK default, {settings.seconds:g} s "
                 "per level) and server RSS",
                 ["model", "server", *(f"{n} client{'s' * (n > 1)}" for n in settings.clients),
                  "RSS MiB after warm-up", "RSS MiB after load"],
                 [[arch, mode, *(f"{m['explanations_per_s'][n]:.1f}" for n in settings.clients),
                   f"{m['rss_mib_after_warmup']:.0f}", f"{m['rss_mib_after_load']:.0f}"]
                  for arch, mode, m in per_server(results)])


def sizes_table(results: dict[str, Any]) -> list[str]:
    def cell(name: str, size: int) -> str:
        return mark(str(size), size < 1024) if name == "feature_map_float16" else str(size)

    return table("Response size (bytes, serialized ExplainResponse, one target)",
                 ["model", "server", "FEATURE_MAP float16 (< 1 KB)", "MODEL_INPUT float16",
                  "MODEL_INPUT float32"],
                 [[arch, mode, *(cell(k, b) for k, b in m["response_bytes"].items())]
                  for arch, mode, m in per_server(results)])


def report(machine: dict[str, Any], settings: Settings, results: dict[str, Any],
           jpeg_bytes: int, notes: list[str]) -> str:
    where = "CPU" if settings.device == "cpu" else f"{machine['gpu']} (CUDA)"
    lines = ["# camserve vs grad-cam vs Captum: one Grad-CAM explanation", "",
             f"{machine['cpu']}, {machine['cores']} cores; onnxruntime "
             f"{machine['onnxruntime']}, torch {machine['torch']}, grad-cam "
             f"{machine['grad-cam']}, captum {machine['captum']}; {settings.threads} threads "
             f"(onnxruntime intra-op = torch). {where}, B=1, {SIZE}x{SIZE}, one target (the "
             f"predicted class); median of {settings.runs} interleaved runs after "
             f"{settings.warmup} warm-up rounds; request: samples/cat.jpg resized to "
             f"{SIZE}x{SIZE}, JPEG quality {JPEG_QUALITY} ({jpeg_bytes} bytes).", ""]
    lines += latency_table(results) + goals_table(results) + stages_table(results)
    lines += throughput_table(results, settings) + sizes_table(results)
    lines += [f"Note: {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "grad-cam": installed("grad-cam"), "captum": installed("captum"),
            "grpcio": grpc.__version__, "threads": threads, "device": device, "gpu": gpu}


def parse_args() -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="onnxruntime's provider, the servers' --device and torch's device")
    parser.add_argument("--precision", nargs="+", choices=contract.PRECISIONS,
                        default=[contract.FLOAT32],
                        help="export each model in these precisions (one row each)")
    parser.add_argument("--threads", type=int, default=2,
                        help="onnxruntime intra-op threads (bench and server) = torch threads")
    parser.add_argument("--runs", type=int, help="timed rounds (default 30, --quick 5)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 5, --quick 1)")
    parser.add_argument("--seconds", type=float,
                        help="duration of each throughput level (default 5, --quick 1)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16],
                        help="concurrent client threads per throughput level")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    quick = args.quick
    settings = Settings(
        device=args.device, threads=args.threads, runs=args.runs or (5 if quick else 30),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 5),
        seconds=args.seconds or (1.0 if quick else 5.0), clients=tuple(args.clients))
    return args, settings


def main() -> None:
    args, settings = parse_args()
    torch.set_num_threads(settings.threads)
    modes, notes = server_modes()
    machine = machine_info(settings.threads, settings.device)
    if installed("captum") == "not installed":
        notes.append("Captum is not installed: no (e)")
    jpeg = sample_jpeg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="camserve-bench-") as folder:
        scratch = Path(folder)
        for arch in args.models:
            for precision in args.precision:
                progress(f"{arch}: exporting ({precision})")
                subject = prepare(arch, scratch, jpeg, precision)
                results[subject_name(subject)] = measure(subject, settings, modes, jpeg,
                                                         scratch, notes)
    text = report(machine, settings, results, len(jpeg), notes)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(text)
    (args.out / "bench.json").write_text(json.dumps(
        {"machine": machine, "settings": asdict(settings), "request_jpeg_bytes": len(jpeg),
         "server_modes": modes,
         "notes": notes, "models": results}, indent=1))


if __name__ == "__main__":
    main()
