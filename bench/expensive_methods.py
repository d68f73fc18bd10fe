"""Score-CAM and Ablation-CAM: camserve beside grad-cam 1.5.7 on torch, each side a process.

``make bench-methods`` (or ``.venv/bin/python bench/expensive_methods.py [--rounds N]``).
torchvision resnet18 with seeded random weights (one state_dict for the export and for
torch), layer ``layer4`` [512,7,7], 224x224 input; targets: the --top-k highest classes
(default 1: the predicted class; the same on every side, checked). Every side gets the same
picture: samples/cat.jpg through camserve's preprocessing, saved to .npy (the e2e request
sends that tensor). The sides:

  camserve       ``Pipeline.explain`` with a ``Direct`` runner on ``server.runtime``'s
                 onnxruntime CPU model (explainer graph + head companion), --threads
                 intra-op threads (spinning: onnxruntime's default, as the server), no torch
                 in the process
  camserve e2e   ``Client.explain`` over gRPC on loopback to ``camserve serve --device cpu
                 --intra-op-threads N`` in its own process; the client in this process,
                 which never imports torch
  grad-cam       ``ScoreCAM`` / ``AblationCAM`` of grad-cam 1.5.7 on torch (CPU,
                 ``torch.set_num_threads(N)``), ``ClassifierOutputTarget(class)``, in its
                 own process; its ``batch_size`` is --gradcam-batch (default: camserve's
                 batch, ``methods.FORWARD_BATCH``; grad-cam's own defaults are 16 for
                 ScoreCAM and 32 for AblationCAM). Several targets: one call on the image
                 repeated K times, grad-cam's way (it reruns the masked batches per target;
                 camserve reads all K classes off one set of runs)

Every call runs once per round, in a fresh random order, --pause-ms after the previous one,
after --warmup rounds; the table gives median and p10-p90 in seconds and the ratio
grad-cam / camserve of the medians and of the fastest runs (the least disturbed by other
work on a shared machine). Quote the ratios (measured side by side, interleaved), not the
absolute times. After the rounds each side's last maps are compared with grad-cam's (max
|difference|), a check that the sides computed the same thing.

Writes bench/results/expensive_methods.{md,json} (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import Server, Side, machine, progress  # bench/compare.py
from frames import settings, summary, time_rounds, write_report  # bench/frames.py

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "cat.jpg"
ARCH, LAYER, SEED = "resnet18", "layer4", 0
METHODS = ("scorecam", "ablationcam")
GRADCAM_CLASS = {"scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}
TARGET_RATIO = 5.0  # the target: grad-cam / camserve >= 5
TIMEOUT_S = 900.0
# torch-cam's published CPU figure (their README, a laptop i7), quoted as theirs
TORCHCAM_SCORECAM_S = 6.8


# --- the measured sides, each a process of its own ----------------------------------------
def worker(args: argparse.Namespace) -> None:
    """Serve one side on stdin/stdout: 'ready <json>' first, then per line
    'run METHOD C1,C2,..' -> the milliseconds it took, 'save METHOD PATH' -> writes that
    method's last maps [K,H,W] float32 to PATH and answers 'ok'."""
    image = np.load(args.tensor)  # [1,3,224,224] float32
    info: dict[str, Any] = {"pid": os.getpid()}
    explain: Callable[[str, list[int]], np.ndarray]
    if args.worker == "camserve":
        from camserve.client import Client  # the request the SDK would send (no gRPC here)
        from camserve.explain import methods
        from camserve.explain.pipeline import Direct, Pipeline
        from camserve.server.runtime import load_model

        model = load_model(args.model, "cpu", args.threads)
        model.warm_up()  # and onnxruntime's memory grown to a full batch of each kind:
        batch = np.repeat(image, methods.FORWARD_BATCH, axis=0)
        logits = model.logits(batch)[:1]
        model.head_logits(LAYER, np.zeros((methods.FORWARD_BATCH, *model.card.layer(LAYER).shape),
                                          np.float32))
        pipeline, runner = Pipeline(), Direct(model)
        info |= {"intra_op_threads": args.threads, "provider": model.provider,
                 "top_classes": np.argsort(-logits[0])[:args.top_k].tolist(),
                 "batch_size": methods.FORWARD_BATCH}

        def explain(method: str, targets: list[int]) -> np.ndarray:
            request = Client.request(tensor=image, targets=targets, method=method,
                                     layers=[LAYER])
            return np.stack([t.cam for t in pipeline.explain(request, model, runner).targets])
        assert "torch" not in sys.modules, "torch must stay out of the camserve side"
    else:
        os.environ["TQDM_DISABLE"] = "1"  # grad-cam's progress bars
        import torch
        from pytorch_grad_cam import AblationCAM, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        from camserve.export.models import load

        torch.set_num_threads(args.threads)
        module = load(ARCH, args.weights).module.eval()
        layer = dict(module.named_modules())[LAYER]
        x = torch.from_numpy(image)
        with torch.no_grad():
            top = torch.argsort(module(x)[0], descending=True)[:args.top_k].tolist()
            module(x.repeat(args.gradcam_batch, 1, 1, 1))  # warm: a full batch once
        info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                 "torch_interop_threads": torch.get_num_interop_threads(), "top_classes": top,
                 "batch_size": args.gradcam_batch}
        kinds = {"scorecam": ScoreCAM, "ablationcam": AblationCAM}

        def explain(method: str, targets: list[int]) -> np.ndarray:
            with kinds[method](model=module, target_layers=[layer]) as cam:
                cam.batch_size = args.gradcam_batch
                return cam(input_tensor=x.repeat(len(targets), 1, 1, 1),
                           targets=[ClassifierOutputTarget(c) for c in targets])
    last: dict[str, np.ndarray] = {}
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        command, method, value = line.split()
        if command == "save":
            np.save(value, np.asarray(last[method], np.float32))
            print("ok", flush=True)
            continue
        start = time.perf_counter()
        last[method] = explain(method, [int(c) for c in value.split(",")])
        print(f"{(time.perf_counter() - start) * 1e3:.4f}", flush=True)


def prepare(folder: Path) -> None:
    """(in a torch process) ``--prepare FOLDER``: resnet18's seeded state_dict."""
    import torch

    from camserve.export.models import load

    torch.manual_seed(SEED)
    torch.save(load(ARCH).module.state_dict(), folder / f"{ARCH}.pt")


def export_model(scratch: Path) -> tuple[Path, Path]:
    """(explainer with its head companion, torch weights), under ``scratch``."""
    subprocess.run([sys.executable, __file__, "--prepare", str(scratch)], check=True)
    weights, models = scratch / f"{ARCH}.pt", scratch / "models"
    subprocess.run([sys.executable, "-m", "camserve", "export", "--arch", ARCH, "--weights",
                    str(weights), "--layer", LAYER, "--out", str(models)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return models / f"{ARCH}.onnx", weights


# --- the run --------------------------------------------------------------------------------
def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from camserve import modelfile
    from camserve.client import Client
    from camserve.explain.image import decode, preprocess

    progress("exporting resnet18 (explainer + head)")
    explainer, weights = export_model(scratch)
    card = modelfile.explainer(modelfile.read(explainer)).card
    image = preprocess(decode(SAMPLE.read_bytes()), card.preprocessing)[0]
    tensor = scratch / "input.npy"
    np.save(tensor, image)
    common = ["--tensor", str(tensor), "--threads", str(args.threads), "--model",
              str(explainer), "--weights", str(weights), "--gradcam-batch",
              str(args.gradcam_batch), "--top-k", str(args.top_k)]
    sides: dict[str, Side] = {}
    server, client = None, None
    load_before = os.getloadavg()
    try:
        progress("starting the sides")
        sides["camserve"] = Side("camserve", common, script=__file__)
        if not args.no_torch:
            sides["grad-cam"] = Side("grad-cam", common, script=__file__)
        tops = {name: side.info["top_classes"] for name, side in sides.items()}
        if any(top != tops["camserve"] for top in tops.values()):
            raise RuntimeError(f"the sides disagree on the top classes: {tops}")
        targets = tops["camserve"]
        listed = ",".join(map(str, targets))
        calls: dict[str, Callable[[], float]] = {}
        for method in args.methods:
            for name, side in sides.items():
                calls[f"{method}/{name}"] = (
                    lambda side=side, method=method: side.ask(f"run {method} {listed}"))
        last_e2e: dict[str, np.ndarray] = {}
        if not args.no_e2e:
            server = Server(explainer.parent, args.threads, [], scratch / "server.log", "cpu")
            client = Client(server.address, timeout=TIMEOUT_S)

            def e2e(method: str) -> float:
                start = time.perf_counter()
                found = client.explain(tensor=image, targets=targets, method=method,
                                       layers=[LAYER])
                elapsed = (time.perf_counter() - start) * 1e3
                last_e2e[method] = np.stack([e.cam_input for e in found])
                return elapsed
            for method in args.methods:
                calls[f"{method}/camserve e2e"] = lambda method=method: e2e(method)
        progress(f"{len(calls)} calls x {args.rounds} rounds ({args.warmup} warm-up)")
        load_rounds = os.getloadavg()
        times = time_rounds(calls, args.rounds, args.warmup, args.pause_ms / 1e3)
        load_after = os.getloadavg()
        maps = {}
        for method in args.methods:
            for name, side in sides.items():
                path = scratch / f"{method}-{name}.npy"
                side.ask_line(f"save {method} {path}")
                maps[f"{method}/{name}"] = np.load(path)
            if method in last_e2e:
                maps[f"{method}/camserve e2e"] = last_e2e[method]
        info = {name: side.info for name, side in sides.items()}
    finally:
        if client is not None:
            client.close()
        for side in sides.values():
            side.stop()
        if server is not None:
            server.stop()
    latency = {key: summary([t / 1e3 for t in samples]) | {"min": min(samples) / 1e3}
               for key, samples in times.items()}
    difference = {key: float(np.abs(value - maps[f"{key.split('/')[0]}/grad-cam"]).max())
                  for key, value in maps.items()
                  if not key.endswith("/grad-cam") and f"{key.split('/')[0]}/grad-cam" in maps}
    return {"targets": targets, "latency_s": latency, "max_abs_diff_vs_grad_cam": difference,
            "sides": info, "load_average": {"before": load_before, "rounds_start": load_rounds,
                                            "rounds_end": load_after}}


# --- the report -----------------------------------------------------------------------------
def report(machine_info: dict[str, Any], args: argparse.Namespace,
           result: dict[str, Any]) -> str:
    sides, latency = result["sides"], result["latency_s"]
    torch_side = sides.get("grad-cam", {})
    load = result["load_average"]
    ort = machine_info["onnxruntime"]
    if ort == "not installed":
        ort = machine_info["onnxruntime-gpu"]
    setup = (f"{machine_info['cpu']}, {machine_info['cores']} cores; onnxruntime {ort}, torch "
             f"{machine_info['torch']}, grad-cam {machine_info['grad-cam']}. {args.threads} "
             "threads on every side (onnxruntime intra-op = the server's --intra-op-threads = "
             f"torch.set_num_threads; torch reports {torch_side.get('torch_threads', '-')}). "
             "Each side in its own process, no torch in camserve's. Batch: camserve "
             f"{sides['camserve']['batch_size']} masked images / ablated copies per run, "
             f"grad-cam batch_size {args.gradcam_batch}. Same input everywhere "
             "(samples/cat.jpg preprocessed, .npy); targets: the top "
             f"{len(result['targets'])} class(es) {result['targets']}. Median and p10-p90 of {args.rounds} interleaved "
             f"rounds after {args.warmup} warm-up, {args.pause_ms:g} ms pause before each "
             f"call; 1-minute load average {load['rounds_start'][0]:.2f} -> "
             f"{load['rounds_end'][0]:.2f}.")
    lines = ["# Score-CAM and Ablation-CAM: camserve vs grad-cam 1.5.7 (resnet18 layer4, 224²)",
             "", setup, "",
             ("| method | side | median s | p10-p90 s | fastest s | grad-cam / side: medians "
              "| fastest runs | max abs diff vs grad-cam |"),
             "|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        reference = latency.get(f"{method}/grad-cam")
        for key, v in latency.items():
            if not key.startswith(method + "/"):
                continue
            ratios = ["-", "-"]
            if reference and not key.endswith("/grad-cam"):
                ratios = [f"{value:.1f}× {'✓' if value >= TARGET_RATIO else '✗'}" for value in
                          (reference["median"] / v["median"], reference["min"] / v["min"])]
            diff = result["max_abs_diff_vs_grad_cam"].get(key)
            lines.append(f"| {method} | {key.split('/', 1)[1]} | {v['median']:.3f} | "
                         f"{v['p10']:.3f}-{v['p90']:.3f} | {v['min']:.3f} | {ratios[0]} | "
                         f"{ratios[1]} | {'-' if diff is None else f'{diff:.1e}'} |")
    lines += ["", (f"Target: grad-cam / camserve ≥ {TARGET_RATIO:g}. For scale only: torch-cam "
                   f"publishes {TORCHCAM_SCORECAM_S:g} s for ResNet-18 Score-CAM on a laptop i7 "
                   "CPU (their figure, not measured here).")]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    from camserve.explain.methods import FORWARD_BATCH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, default=2,
                        help="onnxruntime intra-op threads = the server's = torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up rounds (each side "
                        "already ran a full batch once)")
    parser.add_argument("--pause-ms", type=float, default=200.0,
                        help="idle time before each timed call")
    parser.add_argument("--top-k", type=int, default=1,
                        help="explain the K highest classes (camserve: one request)")
    parser.add_argument("--gradcam-batch", type=int, default=FORWARD_BATCH,
                        help="grad-cam's batch_size (its defaults: ScoreCAM 16, AblationCAM 32)")
    parser.add_argument("--no-e2e", action="store_true", help="leave out the gRPC side")
    parser.add_argument("--no-torch", action="store_true", help="leave out grad-cam")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    # the worker processes
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    for name in ("--tensor", "--model", "--weights"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 2 or args.top_k < 1:
        parser.error("--rounds must be at least 2 (for p10-p90) and --top-k at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.prepare:
        prepare(args.prepare)
        return
    info = machine(args.threads)
    with tempfile.TemporaryDirectory(prefix="camserve-bench-methods-") as folder:
        result = measure(args, Path(folder))
    assert "torch" not in sys.modules  # the client side too
    write_report(args.out, "expensive_methods", report(info, args, result),
                 {"machine": info, "settings": settings(args), **result})


if __name__ == "__main__":
    main()
