"""Camera frames end to end: what each kind of input costs over gRPC, beside the graph alone.

``make bench-frames`` (or ``.venv/bin/python bench/frames.py [--rounds 30] [--threads 2]``).

For 640x480, 1920x1080 and 3840x2160 frames of one picture (samples/cat.jpg upscaled, with
fine sinusoids and noise: detail a plain resize aliases; the same pixels on every side), the
SDK's ``Client.explain`` (default options: the predicted class, its map at model-input size
as float16) against ``camserve serve`` in its own process, with each kind of input:

    jpeg            the frame encoded at quality 90 (the server decodes a large one reduced)
    rgb8, bgr8      raw packed frames (``Frame``: the bytes a camera driver hands over)
    nv12            a raw NV12 frame (1.5 bytes per pixel)
    client-resized  the rgb8 frame with ``resize_on_client=True``: resized in the SDK to the
                    model's resize and sent as a small RGB8 frame

and the explainer graph alone (one ``session.run`` on the server's preprocessing of the same
frame) in a separate process without torch, its intra-op pool told not to spin
(``session.intra_op.allow_spinning`` 0: design.md's benchmark traps), and in another such
process spinning, as the server's session does: here spinning off costs the explainer ~5 ms
(6.5 -> 12 ms on 2 cores), so e2e - graph and the issue's targets use the spinning one. Every call runs once per
round, in a fresh random order, after warm-up rounds; the table gives median and p10-p90 (ms),
e2e minus the graph, the request's size on the wire, the server's own stage timings (from the
response's ``Timings`` of the same timed calls) and, for client-resized, the SDK's
resize. The server: ``--device cpu --intra-op-threads N``, a free port, messages up to 64 MB
(a 4K RGB8 frame is 24.9 MB).

Writes bench/results/frames.md (also printed) and bench/results/frames.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
SAMPLE = ROOT / "samples" / "cat.jpg"
SIZES = {"640x480": (480, 640), "1920x1080": (1080, 1920), "3840x2160": (2160, 3840)}
KINDS = ("jpeg", "rgb8", "bgr8", "nv12", "client-resized")
JPEG_QUALITY = 90
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
TIMEOUT_S = 60.0
STAGES = ("decode", "preprocess", "inference", "postprocess")
# the targets at 1080p: e2e <= graph + this many ms
TARGETS = {("1920x1080", "nv12"): 4.0, ("1920x1080", "bgr8"): 4.0, ("1920x1080", "jpeg"): 6.0}


def textured_frame(height: int, width: int) -> np.ndarray:
    """uint8 RGB [H,W,3]: the cat photo upscaled (bicubic), plus two fine sinusoids and
    Gaussian noise (sigma 8), as tests/integration/test_downscale.py builds it.
    Deterministic."""
    cat = cv2.cvtColor(cv2.imread(str(SAMPLE)), cv2.COLOR_BGR2RGB)
    frame = cv2.resize(cat, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frame += (20 * np.sin(xx * 0.9 + yy * 0.35) + 15 * np.sin(yy * 1.3))[..., None]
    frame += np.random.default_rng(0).normal(0, 8, frame.shape).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8)


def nv12_of(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H*3/2, W]: NV12 (a Y plane, then interleaved U V rows at half height)."""
    h, w = rgb.shape[:2]
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    u = i420[h:h + h // 4].reshape(h // 2, w // 2)
    v = i420[h + h // 4:].reshape(h // 2, w // 2)
    return np.concatenate([i420[:h], np.stack([u, v], axis=-1).reshape(h // 2, w)])


def inputs(rgb: np.ndarray) -> dict[str, tuple[Any, dict[str, Any]]]:
    """kind -> (what Client.explain gets, its extra options), all showing ``rgb``."""
    from camserve.client import Frame

    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
    raw = Frame.from_array(rgb, "rgb8")
    return {"jpeg": (jpeg, {}), "rgb8": (raw, {}), "bgr8": (Frame.from_array(bgr, "bgr8"), {}),
            "nv12": (Frame.from_array(nv12_of(rgb), "nv12"), {}),
            "client-resized": (raw, {"resize_on_client": True})}


# --- the graph alone, in its own process --------------------------------------------------
def graph_worker(model: Path, threads: int, tensors: Path, spinning: bool) -> None:
    """Read a size name per line from stdin; run the explainer once on that size's tensor;
    answer the milliseconds of ``session.run``. No torch in this process."""
    import onnxruntime as ort

    from camserve.server.runtime import session_options

    options = session_options(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feeds = {path.stem: {"image": np.load(path), "targets": np.full((1, 1), -1, np.int64)}
             for path in tensors.glob("*.npy")}
    assert "torch" not in sys.modules
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        session.run(None, feeds[line.strip()])
        print(f"{(time.perf_counter() - start) * 1e3:.4f}", flush=True)


class Graph:
    """The graph-alone process: ``run(size)`` -> its ``session.run`` milliseconds."""

    def __init__(self, threads: int, tensors: Path, spinning: bool) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--graph-worker", "--threads", str(threads),
             "--tensors", str(tensors), *(["--spinning"] if spinning else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the graph process did not start")

    def run(self, size: str) -> float:
        self.process.stdin.write(size + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(10)


# --- the server ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(models: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    from camserve.client import Client

    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "camserve", "serve", "--models", str(models), "--port",
             str(port), "--device", "cpu", "--intra-op-threads", str(threads),
             "--max-message-bytes", str(MAX_MESSAGE_BYTES)], stdout=out,
            stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    with Client(address, timeout=2) as client:
        if not client.wait_until_serving(300, lambda: process.poll() is None):
            process.kill()
            raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
    return process, address


# --- timing -------------------------------------------------------------------------------
def time_rounds(calls: dict[str, Callable[[], float]], rounds: int, warmup: int,
                pause_s: float, burst: int = 1) -> dict[str, list[float]]:
    """Each call returns its own milliseconds; every round runs each one ``burst`` times in a
    row, the calls in a fresh (seeded) random order, each ``pause_s`` after the previous one
    (so that no call meets the thread pools of the one before still spinning).

    With ``burst`` 1, ``times[name]`` holds every call. With more, the first call of each
    burst meets caches that the other processes' calls refilled; it goes to
    ``times[name + " first"]``, and ``times[name]`` holds the rest, which find the
    process's own weights and buffers still cached, as a server that runs one model meets
    them."""
    names, order = list(calls), random.Random(0)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    if burst > 1:
        times.update({f"{name} first": [] for name in names})
    for index in range(rounds):
        for name in order.sample(names, len(names)):
            for repeat in range(burst):
                time.sleep(pause_s)
                key = f"{name} first" if burst > 1 and repeat == 0 else name
                times[key].append(calls[name]())
        print(f"round {index + 1}/{rounds}", end="\r", flush=True)
    print()
    return times


def steady(records: list[Any], warmup: int, burst: int) -> list[Any]:
    """Of what one call recorded on each of its ``time_rounds`` runs, in order: the runs
    whose times went to ``times[name]`` (not the warm-up rounds, not a burst's first)."""
    timed = records[warmup:]
    return [r for i, r in enumerate(timed) if burst == 1 or i % burst != 0]


def explain_call(client, image: Any, record: list[tuple[float, ...]], **options: Any
                 ) -> Callable[[], float]:
    """``client.explain(image, **options)`` timed (ms); each call appends to ``record`` the
    server's stage times (ms, in the order of ``STAGES``) and then the rest of the call."""
    def call() -> float:
        start = time.perf_counter()
        found = client.explain(image, **options)
        total = (time.perf_counter() - start) * 1e3
        server = found[0].server_timings
        record.append((*(getattr(server, f"{stage}_ms") for stage in STAGES),
                       total - server.total_ms))
        return total
    return call


def summary(samples: list[float]) -> dict[str, Any]:
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"median": statistics.median(samples), "p10": deciles[0], "p90": deciles[-1],
            "samples": [round(s, 3) for s in samples]}


def write_report(out: Path, stem: str, text: str, data: Any) -> None:
    """Print a benchmark's report and write it to ``out``/``stem``.md, with ``data`` (its
    figures, settings and machine) to ``stem``.json."""
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))


def settings(args: Any) -> dict[str, Any]:
    """A parsed command line as JSON can hold it (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where there is none)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def machine(threads: int) -> dict[str, Any]:
    import grpc
    import onnxruntime as ort

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "opencv": cv2.__version__,
            "numpy": np.__version__, "grpcio": grpc.__version__,
            "server_intra_op_threads": threads, "graph_intra_op_threads": threads,
            "opencv_threads_client": cv2.getNumThreads(),
            "thread_env": {k: v for k, v in os.environ.items()
                           if k.endswith("_NUM_THREADS")}}


# --- the run ------------------------------------------------------------------------------
def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from camserve.client import Client
    from camserve.client.options import client_resized
    from camserve.explain.image import preprocess

    frames = {size: textured_frame(*hw) for size, hw in SIZES.items()}
    models = scratch / "models"
    models.mkdir()
    for path in MODEL.parent.glob(MODEL.stem + ".*onnx"):  # the explainer and its head
        (models / path.name).symlink_to(path)
    process, address = start_server(models, args.threads, scratch / "server.log")
    try:
        with Client(address, timeout=TIMEOUT_S, max_message_bytes=MAX_MESSAGE_BYTES) as client:
            info = client.get_model(MODEL.stem)
            spec = info.preprocessing
            tensors = scratch / "tensors"
            tensors.mkdir()
            for size, rgb in frames.items():
                np.save(tensors / f"{size}.npy", preprocess(rgb, spec)[0])
            graphs = {key: Graph(args.threads, tensors, spinning) for key, spinning
                      in (("graph", False), ("graph-spinning", True))}
            try:
                calls: dict[str, Callable[[], float]] = {}
                given = {size: inputs(rgb) for size, rgb in frames.items()}
                stages: dict[str, list[tuple[float, ...]]] = {}
                for size in SIZES:
                    for key, graph in graphs.items():
                        calls[f"{size}/{key}"] = lambda size=size, graph=graph: graph.run(size)
                    for kind, (image, extra) in given[size].items():
                        stages[f"{size}/{kind}"] = []
                        calls[f"{size}/{kind}"] = explain_call(
                            client, image, stages[f"{size}/{kind}"], model=MODEL.stem, **extra)
                print(f"{len(calls)} calls x {args.rounds} rounds ({args.warmup} warm-up)")
                times = time_rounds(calls, args.rounds, args.warmup, args.pause_ms / 1e3)
            finally:
                for graph in graphs.values():
                    graph.stop()
            details = {size: _details(client, given[size], spec, client_resized)
                       for size in SIZES}
            for size in SIZES:  # the server's stages of the timed calls
                for kind in given[size]:
                    rows = steady(stages[f"{size}/{kind}"], args.warmup, 1)
                    details[size][kind]["server_ms"] = dict(zip(
                        STAGES, np.median(rows, axis=0)[:len(STAGES)].tolist()))
    finally:
        process.terminate()
        process.wait(10)
    return {"model": info.name, "preprocessing": {"resize": spec.resize, "crop": spec.crop},
            "latency_ms": {key: summary(samples) for key, samples in times.items()},
            "details": details}


def _details(client, given: dict[str, tuple[Any, dict]], spec, client_resized,
             calls: int = 7) -> dict[str, Any]:
    """Per kind: the request's bytes; client-resized also the SDK's resize (ms)."""
    from camserve.client import Client

    out = {}
    for kind, (image, extra) in given.items():
        resize_ms = []
        if extra.get("resize_on_client"):
            for _ in range(calls):
                start = time.perf_counter()
                small, _ = client_resized(image, spec)
                resize_ms.append((time.perf_counter() - start) * 1e3)
            image = small
        out[kind] = {"request_bytes": Client.request(image, model=MODEL.stem).ByteSize()}
        if resize_ms:
            out[kind]["client_resize_ms"] = statistics.median(resize_ms)
    return out


def report(result: dict[str, Any], info: dict[str, Any], args: argparse.Namespace) -> str:
    latency, details = result["latency_ms"], result["details"]
    lines = ["# Camera frames: e2e latency per input kind (EfficientNet-Lite0, CPU)", "",
             (f"{info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}, "
              f"OpenCV {info['opencv']}, NumPy {info['numpy']}, grpcio {info['grpcio']}. "
              f"Server `camserve serve --device cpu --intra-op-threads {args.threads}` in its "
              f"own process; graph alone: one `session.run` of the explainer, {args.threads} "
              "intra-op threads, in a process without torch, its pool's spinning off (as "
              "design.md says for side-by-side timing) and, in another such process, on (as "
              "the server runs it): e2e - graph and the targets use the latter, the smaller. "
              f"Model {result['model']} (resize {result['preprocessing']['resize']}, crop "
              f"{result['preprocessing']['crop'][0]}). SDK default request (predicted class, "
              f"map at model-input size, float16). Median and p10-p90 of {args.rounds} "
              f"interleaved rounds after {args.warmup} warm-up rounds, each call "
              f"{args.pause_ms:g} ms after the previous; the same picture on every side; "
              f"JPEG quality {JPEG_QUALITY}. Server stages: medians over the same timed calls "
              "(`Explanation.server_timings`)."), "",
             ("| frame | input | e2e ms (median) | p10-p90 | e2e - graph ms | target | "
              "request bytes | server decode / preprocess / inference / postprocess ms | "
              "client resize ms |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        for key, name in (("graph", "graph alone, spinning off"),
                          ("graph-spinning", "graph alone, spinning on")):
            g = latency[f"{size}/{key}"]
            lines.append(f"| {size} | {name} | {g['median']:.1f} | {g['p10']:.1f}-"
                         f"{g['p90']:.1f} | | | | | |")
        graph = latency[f"{size}/graph-spinning"]["median"]
        for kind in KINDS:
            e, d = latency[f"{size}/{kind}"], details[size][kind]
            over = e["median"] - graph
            limit = TARGETS.get((size, kind))
            target = "" if limit is None else f"≤ {limit:g} {'✓' if over <= limit else '✗'}"
            stages = " / ".join(f"{d['server_ms'][s]:.1f}" for s in STAGES)
            resize = f"{d['client_resize_ms']:.1f}" if "client_resize_ms" in d else ""
            lines.append(f"| {size} | {kind} | {e['median']:.1f} | {e['p10']:.1f}-"
                         f"{e['p90']:.1f} | {over:+.1f} | {target} | {d['request_bytes']:,} | "
                         f"{stages} | {resize} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up rounds")
    parser.add_argument("--pause-ms", type=float, default=20.0,
                        help="idle time before each timed call")
    parser.add_argument("--threads", type=int, default=2,
                        help="onnxruntime intra-op threads (server and graph alone)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--graph-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tensors", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spinning", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.graph_worker:
        graph_worker(MODEL, args.threads, args.tensors, args.spinning)
        return
    if not MODEL.is_file():
        subprocess.run([sys.executable, "-m", "camserve", "export", "--arch",
                        "efficientnet_lite0", "--out", str(MODEL.parent)], check=True)
    with tempfile.TemporaryDirectory(prefix="camserve-frames-") as folder:
        result = measure(args, Path(folder))
    assert "torch" not in sys.modules  # the client side too
    info = machine(args.threads)
    write_report(args.out, "frames", report(result, info, args),
                 {"machine": info, "rounds": args.rounds, "warmup": args.warmup, **result})


if __name__ == "__main__":
    main()
