"""What a Grad-CAM explanation costs, each side measured in a process of its own.

``make bench`` (or ``.venv/bin/python bench/compare.py [--quick] [--device cuda]``). For
each model
(EfficientNet-Lite0, pretrained: models/efficientnet_lite0.onnx, exported when missing;
resnet50 with seeded random weights, exported into a temporary folder), on the CPU
(``--device cuda``: onnxruntime's CUDA provider, the servers and torch on the GPU), B=1,
the same thread count everywhere (onnxruntime intra-op threads = torch threads = --threads):

  forward        onnxruntime, the plain classifier (torch.onnx.export of the same weights)
  graph          onnxruntime, the explainer graph: one ``session.run``
  graph+cam      the same session, then camserve's Grad-CAM postprocessing to the model input
  e2e            ``Client.explain`` (SDK default: predicted class, map at model input,
                 float16) of samples/cat.jpg over gRPC on loopback to ``camserve serve`` in
                 its own process, dynamic batching on (the default) and off
  grad-cam       grad-cam 1.5.7 ``GradCAM`` on torch, ``ClassifierOutputTarget(top class)``
  captum         Captum ``LayerGradCam`` + ``LayerAttribution.interpolate`` on torch

The onnxruntime sides run once with the intra-op pool spinning (onnxruntime's default, what
the server runs) and once with ``session.intra_op.allow_spinning`` 0, each in its own process
without torch (design.md's benchmark traps); the torch sides each in their own process, on
the same weights (resnet50: one seeded state_dict for the export and for torch). Every side
gets the same picture: samples/cat.jpg through camserve's preprocessing, saved to .npy (the
server gets cat.jpg itself and makes that tensor). Every round runs each side ``--burst``
times in a row, the sides in a fresh random order, each call ``--pause-ms`` after the
previous one, after warm-up rounds. The tables give median and p10-p90 of the calls after the
first of each burst, and the first calls' median apart: between bursts the other sides'
processes evict a side's weights from the caches, which costs the e2e side (graph, gRPC,
decoding: the largest working set) most, while a server that runs one model finds them there.
The 1-minute load average is recorded before and after each model.

``--precision float32 float16`` measures each model once per precision (one row each): the
explainer (``camserve export --precision``) and the plain classifier (converted by
``camserve.export.precision.to_float16``, float32 interface) in that precision; grad-cam and
Captum always run float32 torch. Meant for ``--device cuda``: onnxruntime's CPU provider has
few float16 kernels.

Throughput: the explainer graph's best in-process rate over batch sizes (its own process,
spinning) is the limit; 1/4/16 concurrent clients' explanations/s over gRPC, with and without
batching, as a fraction of it.

Writes bench/results/bench.md (also printed) and bench/results/bench.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frames import (  # bench/frames.py
    STAGES,
    cpu_name,
    explain_call,
    free_port,
    settings,
    steady,
    summary,
    time_rounds,
    write_report,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "cat.jpg"
LITE0 = ROOT / "models" / "efficientnet_lite0.onnx"
TIMEOUT_S = 60.0
SEED = 0
# the targets: e2e/forward per model, graph/forward for every model
E2E_TARGET = {"efficientnet_lite0": 1.25, "resnet50": 1.05}
GRAPH_TARGET = 1.03
LABELS = {
    "forward/spin": "onnxruntime forward, plain classifier (spinning)",
    "forward/nospin": "onnxruntime forward, plain classifier (spinning off)",
    "graph/spin": "explainer graph, session.run (spinning)",
    "graph/nospin": "explainer graph, session.run (spinning off)",
    "graph+cam/spin": "explainer graph + Grad-CAM to model input, in-process (spinning)",
    "e2e/batching": "camserve e2e over gRPC, cat.jpg, SDK default (batching on)",
    "e2e/no-batching": "camserve e2e over gRPC, cat.jpg, SDK default (--no-batching)",
    "grad-cam": "grad-cam 1.5.7 GradCAM, torch",
    "captum": "Captum LayerGradCam + interpolate, torch",
}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", flush=True)


# --- the measured sides, each a process of its own ----------------------------------------
def worker(args: argparse.Namespace) -> None:
    """Serve one side on stdin/stdout: 'ready <json>' first, then per line 'run', 'explain'
    or 'batch B N' the milliseconds it took (batch: the fastest of N runs at batch B)."""
    image = np.load(args.tensor)
    calls: dict[str, Callable[[], object]] = {}
    info: dict[str, Any] = {"pid": os.getpid()}
    run_batch = None
    if args.worker.startswith("ort"):
        import onnxruntime as ort

        from camserve import modelfile
        from camserve.explain import methods
        from camserve.server.runtime import session_options

        options = session_options(args.threads)
        spinning = "1" if args.spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        providers = (["CUDAExecutionProvider"] if args.device == "cuda" else []) \
            + ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(args.model), options, providers=providers)
        info |= {"onnxruntime": ort.__version__, "allow_spinning": spinning,
                 "intra_op_threads": args.threads, "provider": session.get_providers()[0]}
        if args.worker == "ort-forward":
            feeds = {"image": image}
            calls["run"] = lambda: session.run(None, feeds)
        else:
            card = modelfile.explainer(modelfile.read(args.model)).card
            layers = [layer.name for layer in card.layers]
            fetches = card.fetches(layers)
            feeds = {"image": image, "targets": np.full((1, 1), -1, np.int64)}

            def explain() -> object:
                _, _, per_layer = card.unpack(layers, session.run(fetches, feeds))
                return methods.cam_maps("gradcam", [(a[0], g[0]) for a, g in
                                                    per_layer.values()], card.input_size)

            def run_batch(size: int) -> None:
                session.run(fetches, {"image": np.repeat(image, size, axis=0),
                                      "targets": np.full((size, 1), -1, np.int64)})

            calls["run"] = lambda: session.run(fetches, feeds)
            calls["explain"] = explain
        assert "torch" not in sys.modules, "torch must stay out of the onnxruntime sides"
    else:
        import torch

        from camserve.export.models import load

        torch.set_num_threads(args.threads)
        module = load(args.arch, args.weights).module.eval().to(args.device)
        layer = dict(module.named_modules())[args.layer]
        x = torch.from_numpy(image).to(args.device)
        with torch.no_grad():
            top = int(module(x).argmax())
        info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                 "top_class": top}
        if args.worker == "grad-cam":
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            cam, targets = GradCAM(model=module, target_layers=[layer]), \
                [ClassifierOutputTarget(top)]
            calls["run"] = lambda: cam(input_tensor=x, targets=targets)
        else:
            from captum.attr import LayerAttribution, LayerGradCam

            method = LayerGradCam(module, layer)
            calls["run"] = lambda: LayerAttribution.interpolate(
                method.attribute(x, target=top), tuple(x.shape[2:]))
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "batch":
            size, count = int(rest[0]), int(rest[1])
            run_batch(size)
            times = []
            for _ in range(count):
                start = time.perf_counter()
                run_batch(size)
                times.append((time.perf_counter() - start) * 1e3)
            print(f"{min(times):.4f}", flush=True)  # the best run: what the graph can do
            continue
        start = time.perf_counter()
        calls[command]()
        print(f"{(time.perf_counter() - start) * 1e3:.4f}", flush=True)


class Side:
    """A worker process of ``script`` (``--worker KIND``): ``ask(command)`` -> the
    milliseconds it reports, ``ask_line(command)`` -> its answer line. bench/expensive_methods.py
    runs its own workers through it too."""

    def __init__(self, kind: str, common: list[str], *extra: str, script: str = __file__) -> None:
        self.process = subprocess.Popen(
            [sys.executable, script, "--worker", kind, *common, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("ready "):
            self.process.kill()
            raise RuntimeError(f"the {kind} process did not start")
        self.info = json.loads(line[6:])

    def ask_line(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def ask(self, command: str) -> float:
        return float(self.ask_line(command))

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


# --- models ---------------------------------------------------------------------------------
def tag_of(arch: str, precision: str) -> str:
    """The model's file tag and row label: the architecture, and the precision unless
    float32."""
    return arch if precision == "float32" else f"{arch}-{precision}"


def prepare(args: argparse.Namespace) -> None:
    """(in a torch process) ``--prepare ARCH FOLDER PRECISION``: the plain classifier ONNX of
    ARCH in PRECISION and, for torchvision architectures, a seeded state_dict the explainer
    export and the torch sides share."""
    import warnings

    import torch

    from camserve.export.models import load

    arch, folder, precision = args.prepare[0], Path(args.prepare[1]), args.prepare[2]
    plain = folder / f"{tag_of(arch, precision)}_plain.onnx"
    torch.manual_seed(SEED)
    weights = None
    if arch != "efficientnet_lite0":
        module = load(arch).module.eval()
        weights = folder / f"{arch}.pt"
        torch.save(module.state_dict(), weights)
    module = load(arch, weights).module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, 224, 224),), str(plain),
                          dynamo=False, input_names=["image"], output_names=["logits"],
                          opset_version=17, dynamic_axes={"image": {0: "batch"}})
    if precision == "float16":
        import onnx

        from camserve.export.precision import to_float16

        onnx.save(to_float16(onnx.load(str(plain))), str(plain))


def export_model(arch: str, precision: str, folder: Path) -> tuple[Path, Path, Path | None]:
    """(explainer, plain classifier, torch weights or None) of ``arch`` in ``precision``,
    under ``folder`` (float32 EfficientNet-Lite0: the demo's models/efficientnet_lite0.onnx)."""
    tag = tag_of(arch, precision)
    subprocess.run([sys.executable, __file__, "--prepare", arch, str(folder), precision],
                   check=True)
    weights = folder / f"{arch}.pt"
    if arch == "efficientnet_lite0" and precision == "float32":
        if not LITE0.is_file():
            subprocess.run([sys.executable, "-m", "camserve", "export", "--arch", arch,
                            "--out", str(LITE0.parent)], check=True)
        explainer = LITE0
    else:
        models = folder / tag
        subprocess.run([sys.executable, "-m", "camserve", "export", "--arch", arch,
                        *(["--weights", str(weights)] if weights.is_file() else []),
                        "--precision", precision, "--out", str(models)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        explainer = models / f"{arch}.onnx"
    return explainer, folder / f"{tag}_plain.onnx", weights if weights.is_file() else None


# --- the server -----------------------------------------------------------------------------
class Server:
    def __init__(self, models: Path, threads: int, flags: list[str], log: Path,
                 device: str) -> None:
        from camserve.client import Client

        port = free_port()
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "camserve", "serve", "--models", str(models), "--port",
                 str(port), "--device", device, "--intra-op-threads", str(threads), *flags],
                stdout=out, stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{port}"
        with Client(self.address, timeout=2) as client:
            if not client.wait_until_serving(300, lambda: self.process.poll() is None):
                self.process.kill()
                raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def served_folder(explainer: Path, scratch: Path, tag: str) -> Path:
    """A folder holding only this model (and its companions), for ``--models``."""
    folder = scratch / f"served-{tag}"
    folder.mkdir(exist_ok=True)
    for path in explainer.parent.glob(explainer.stem + ".*onnx"):
        if not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
    return folder


def clients_rate(address: str, jpeg: bytes, model: str, clients: int, seconds: float) -> float:
    """Explanations/s: ``clients`` threads, each with its own Client, for ``seconds``."""
    from camserve.client import Client

    window: dict[str, float] = {}
    gate = threading.Barrier(clients, action=lambda: window.update(start=time.perf_counter()),
                             timeout=TIMEOUT_S)

    def one() -> tuple[int, float]:
        with Client(address, timeout=TIMEOUT_S) as client:
            client.explain(jpeg, model=model)  # connected and warm before the clock starts
            gate.wait()
            end, done = window["start"] + seconds, 0
            while time.perf_counter() < end:
                client.explain(jpeg, model=model)
                done += 1
            return done, time.perf_counter()

    with ThreadPoolExecutor(clients) as pool:
        results = [f.result() for f in [pool.submit(one) for _ in range(clients)]]
    return sum(n for n, _ in results) / (max(t for _, t in results) - window["start"])


# --- one model ------------------------------------------------------------------------------
def measure(arch: str, precision: str, args: argparse.Namespace,
            scratch: Path) -> dict[str, Any]:
    from camserve import modelfile
    from camserve.client import Client
    from camserve.explain.image import decode, preprocess

    load_before = os.getloadavg()
    tag = tag_of(arch, precision)
    progress(f"{tag}: exporting")
    explainer, plain, weights = export_model(arch, precision, scratch)
    card = modelfile.explainer(modelfile.read(explainer)).card
    jpeg = SAMPLE.read_bytes()
    tensor = scratch / f"{tag}.npy"
    np.save(tensor, preprocess(decode(jpeg), card.preprocessing)[0])
    common = ["--tensor", str(tensor), "--threads", str(args.threads), "--device", args.device]
    torch_args = ["--arch", arch, "--layer", card.layers[0].name,
                  *(["--weights", str(weights)] if weights else [])]
    sides: dict[str, Side] = {}
    servers: dict[str, Server] = {}
    clients: dict[str, Any] = {}
    try:
        progress(f"{tag}: starting the sides and servers")
        sides["forward/spin"] = Side("ort-forward", common, "--model", str(plain), "--spinning")
        sides["forward/nospin"] = Side("ort-forward", common, "--model", str(plain))
        sides["graph/spin"] = Side("ort-graph", common, "--model", str(explainer), "--spinning")
        sides["graph/nospin"] = Side("ort-graph", common, "--model", str(explainer))
        for name, package in (("grad-cam", "grad-cam"), ("captum", "captum")):
            if not args.no_torch and installed(package) != "not installed":
                sides[name] = Side(name, common, *torch_args)
        folder = served_folder(explainer, scratch, tag)
        for mode, flags in (("batching", []), ("no-batching", ["--no-batching"])):
            servers[mode] = Server(folder, args.threads, flags, scratch / f"{tag}-{mode}.log",
                                   args.device)
            clients[mode] = Client(servers[mode].address, timeout=TIMEOUT_S)
        calls: dict[str, Callable[[], float]] = {
            key: (lambda side=side: side.ask("run")) for key, side in sides.items()}
        calls["graph+cam/spin"] = lambda: sides["graph/spin"].ask("explain")
        records: dict[str, list[tuple[float, ...]]] = {mode: [] for mode in clients}
        for mode, client in clients.items():
            calls[f"e2e/{mode}"] = explain_call(client, jpeg, records[mode],
                                                model=explainer.stem)
        progress(f"{tag}: {len(calls)} calls x {args.runs} rounds ({args.warmup} warm-up)")
        load_rounds = os.getloadavg()
        times = time_rounds(calls, args.runs, args.warmup, args.pause_ms / 1e3, args.burst)
        load_after_rounds = os.getloadavg()
        stages = {mode: dict(zip((*STAGES, "outside"), np.median(
                      steady(rows, args.warmup, args.burst), axis=0).tolist()))
                  for mode, rows in records.items()}
        progress(f"{tag}: throughput")
        graph_side = sides["graph/spin"]
        batch_ms = {b: graph_side.ask(f"batch {b} {args.batch_runs}") for b in args.batches}
        info = {key: side.info for key, side in sides.items()}
        for key in [k for k in sides if k != "graph/spin"]:  # idle while the clients run
            sides.pop(key).stop()
        limit = max(b * 1e3 / ms for b, ms in batch_ms.items())
        rates = {mode: {n: clients_rate(server.address, jpeg, explainer.stem, n, args.seconds)
                        for n in args.clients} for mode, server in servers.items()}
    finally:
        for client in clients.values():
            client.close()
        for side in sides.values():
            side.stop()
        for server in servers.values():
            server.stop()
    latency = {key: summary(times[key]) for key in LABELS if key in times}
    for key, v in latency.items():
        firsts = times.get(f"{key} first")
        v["first_median"] = statistics.median(firsts) if firsts else None
    med = {key: v["median"] for key, v in latency.items()}
    first = {key: v["first_median"] for key, v in latency.items()}
    ratios = {
        "graph/forward (spinning)": med["graph/spin"] / med["forward/spin"],
        "graph/forward (spinning off)": med["graph/nospin"] / med["forward/nospin"],
        "graph+cam/forward (spinning)": med["graph+cam/spin"] / med["forward/spin"],
        "e2e/forward (batching)": med["e2e/batching"] / med["forward/spin"],
        "e2e/forward (no-batching)": med["e2e/no-batching"] / med["forward/spin"],
    }
    if first["forward/spin"]:
        ratios["e2e/forward (batching, first of a burst)"] = (first["e2e/batching"]
                                                              / first["forward/spin"])
    for torch_side in ("grad-cam", "captum"):
        if torch_side in med:
            ratios[f"{torch_side}/e2e"] = med[torch_side] / med["e2e/batching"]
    return {"arch": arch, "precision": precision, "layer": card.layers[0].name, "explainer": str(explainer),
            "latency_ms": latency, "ratios": ratios, "server_stages_ms": stages,
            "sides": info,
            "throughput": {"graph_batch_ms": batch_ms,
                           "graph_images_per_s": {b: b * 1e3 / ms for b, ms in batch_ms.items()},
                           "limit_images_per_s": limit, "explanations_per_s": rates},
            "load_average": {"before": load_before, "rounds_start": load_rounds,
                             "rounds_end": load_after_rounds, "end": os.getloadavg()}}


# --- the report -----------------------------------------------------------------------------
def installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(threads: int) -> dict[str, Any]:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            **{name: installed(name) for name in ("onnxruntime", "onnxruntime-gpu", "torch",
                                                  "grad-cam", "captum", "grpcio", "numpy",
                                                  "opencv-python-headless")},
            "threads": threads,
            "thread_env": {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")}}


def report(info: dict[str, Any], args: argparse.Namespace, results: dict[str, Any]) -> str:
    ort = info["onnxruntime"] if info["onnxruntime"] != "not installed" \
        else info["onnxruntime-gpu"]
    providers = sorted({side["provider"] for r in results.values()
                        for side in r["sides"].values() if "provider" in side})
    lines = ["# camserve vs the graph alone vs grad-cam and Captum: one Grad-CAM explanation",
             "", f"Device: {args.device}; onnxruntime providers: {', '.join(providers)}.", "",
             (f"{info['cpu']}, {info['cores']} cores; onnxruntime "
             f"{ort}, torch "
             f"{info['torch']}, grad-cam {info['grad-cam']}, captum {info['captum']}, grpcio "
             f"{info['grpcio']}. {args.threads} threads everywhere (onnxruntime intra-op = "
             "torch = the server's --intra-op-threads); every side in its own process, no torch "
             "in the onnxruntime ones; onnxruntime spinning as marked (the server: on, "
             "onnxruntime's default). Same input everywhere: samples/cat.jpg (the e2e request) "
             "and camserve's preprocessing of it (.npy) for the others. B=1, one target (the "
             f"predicted class). {args.runs} interleaved rounds after {args.warmup} warm-up "
             f"rounds; in each round every side runs {args.burst} calls in a row, each "
             f"{args.pause_ms:g} ms after the previous. Median and p10-p90 of all but the "
             "first call of each burst (the side's own weights and buffers still in the "
             "caches, as on a server that runs one model); the first call's median apart "
             "(caches refilled by the other sides' processes)."),
             ""]
    lines += [("| model | measurement | median ms | p10-p90 | first of a burst | "
               "load avg (1 min) |"), "|---|---|---|---|---|---|"]
    for arch, r in results.items():
        load = r["load_average"]
        for key, v in r["latency_ms"].items():
            first = f"{v['first_median']:.2f}" if v.get("first_median") else "-"
            lines.append(f"| {arch} | {LABELS[key]} | {v['median']:.2f} | {v['p10']:.2f}-"
                         f"{v['p90']:.2f} | {first} | {load['rounds_start'][0]:.2f} -> "
                         f"{load['rounds_end'][0]:.2f} |")
    lines += ["", ("| model | graph/forward ≤ 1.03 | graph/forward, spinning off | "
                   "e2e/forward (target) | e2e/forward, no batching | e2e/forward, first of "
                   "a burst | grad-cam/e2e | captum/e2e |"),
              "|---|---|---|---|---|---|---|---|"]
    for arch, r in results.items():
        q = r["ratios"]
        e2e_target = E2E_TARGET.get(arch)
        ok = (lambda v, t: f"{v:.2f} {'✓' if v <= t else '✗'}")
        lines.append(
            f"| {arch} | {ok(q['graph/forward (spinning)'], GRAPH_TARGET)} | "
            f"{q['graph/forward (spinning off)']:.2f} | "
            + (ok(q['e2e/forward (batching)'], e2e_target) + f" (≤ {e2e_target:g})"
               if e2e_target else f"{q['e2e/forward (batching)']:.2f}")
            + f" | {q['e2e/forward (no-batching)']:.2f} | "
            f"{q.get('e2e/forward (batching, first of a burst)', float('nan')):.2f} | "
            f"{q.get('grad-cam/e2e', float('nan')):.1f} | {q.get('captum/e2e', float('nan')):.1f} |")
    lines += ["", ("Server stages (ms, medians over the timed e2e calls above, from each "
                   "response's timings; inference includes any wait in the batching queue; "
                   "outside: the call's time less its stages, i.e. gRPC, protobuf, the "
                   "server's request handling and the SDK):"),
              "",
              "| model | server | decode | preprocess | inference | postprocess | outside |",
              "|---|---|---|---|---|---|---|"]
    for arch, r in results.items():
        for mode, s in r["server_stages_ms"].items():
            lines.append(f"| {arch} | {mode} | " + " | ".join(f"{s[k]:.2f}"
                                                              for k in (*STAGES, "outside"))
                         + " |")
    lines += ["", (f"Throughput: the limit is the explainer graph's best in-process rate over "
                   f"batch sizes {', '.join(map(str, args.batches))} (spinning, fastest of "
                   f"{args.batch_runs} runs each); clients: explanations/s over gRPC, SDK "
                   f"default, {args.seconds:g} s per level, and the fraction of the limit."), "",
              "| model | graph images/s by batch | limit | server | "
              + " | ".join(f"{n} client{'s' * (n > 1)}" for n in args.clients) + " |",
              "|---|---|---|---|" + "---|" * len(args.clients)]
    for arch, r in results.items():
        t = r["throughput"]
        by_batch = ", ".join(f"B={b}: {v:.1f}" for b, v in t["graph_images_per_s"].items())
        for mode, rates in t["explanations_per_s"].items():
            lines.append(f"| {arch} | {by_batch} | {t['limit_images_per_s']:.1f} | {mode} | "
                         + " | ".join(f"{rates[n]:.1f} ({rates[n] / t['limit_images_per_s']:.0%})"
                                      for n in args.clients) + " |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="default: efficientnet_lite0 resnet50 "
                        "(--quick: efficientnet_lite0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="onnxruntime's provider (plain session.run, no IO binding), the "
                        "servers' --device and torch's device")
    parser.add_argument("--precision", nargs="+", choices=("float32", "float16"),
                        default=["float32"], help="export each model in these precisions (one "
                        "row each; float16 is for --device cuda)")
    parser.add_argument("--threads", type=int, default=2,
                        help="onnxruntime intra-op threads (sides and servers) = torch threads")
    parser.add_argument("--runs", type=int, help="timed rounds (default 30, --quick 5)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 3, --quick 1)")
    parser.add_argument("--pause-ms", type=float, default=20.0,
                        help="idle time before each timed call")
    parser.add_argument("--burst", type=int, default=4,
                        help="calls in a row per side and round; the first is reported apart")
    parser.add_argument("--seconds", type=float,
                        help="duration of each throughput level (default 5, --quick 1)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batches", type=int, nargs="+",
                        help="graph batch sizes for the limit (default 1 2 4 8 16, --quick 1 4)")
    parser.add_argument("--batch-runs", type=int, help="runs per batch size (default 10, "
                        "--quick 3)")
    parser.add_argument("--no-torch", action="store_true", help="leave out grad-cam and Captum")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    # the worker processes
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=3, help=argparse.SUPPRESS)
    for name in ("--tensor", "--model", "--arch", "--layer", "--weights"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--spinning", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.models = args.models or (["efficientnet_lite0"] if quick
                                  else ["efficientnet_lite0", "resnet50"])
    args.runs = args.runs or (5 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.seconds = args.seconds or (1.0 if quick else 5.0)
    args.batches = args.batches or ([1, 4] if quick else [1, 2, 4, 8, 16])
    args.batch_runs = args.batch_runs or (3 if quick else 10)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.prepare:
        prepare(args)
        return
    info = machine(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="camserve-bench-") as folder:
        for arch in args.models:
            for precision in args.precision:
                results[tag_of(arch, precision)] = measure(arch, precision, args, Path(folder))
    assert "torch" not in sys.modules  # the client side too
    write_report(args.out, "bench", report(info, args, results),
                 {"machine": info, "settings": settings(args), "models": results})


if __name__ == "__main__":
    main()
