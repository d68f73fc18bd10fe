"""What an explanation costs over a plain forward pass (``make bench``).

For each model: export the plain classifier and the explainer graph, then time both on
onnxruntime's CPU provider with the same settings, interleaved in one process, B=1, 224².
Prints a Markdown table of medians and the ratio explainer / forward (goal: <= 1.10) and
writes it as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from camserve.export import export_explainer
from camserve.export.models import load


def plain_forward(model: torch.nn.Module, path: Path, size: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, size, size),), str(path),
                          dynamo=False, input_names=["image"], output_names=["logits"],
                          opset_version=17)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(arch: str, threads: int, runs: int, folder: Path) -> dict:
    loaded = load(arch) if arch == "efficientnet_lite0" else None
    module = loaded.module if loaded else torchvision.models.get_model(arch).eval()
    size = 224
    plain_path, explainer_path = folder / f"{arch}_plain.onnx", folder / f"{arch}.onnx"
    plain_forward(module, plain_path, size)
    export_explainer(module, explainer_path, input_size=size, architecture=arch)
    plain, explainer = session(plain_path, threads), session(explainer_path, threads)
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    targets = np.full((1, 1), -1, np.int64)
    for _ in range(5):  # warm-up
        plain.run(None, {"image": image})
        explainer.run(None, {"image": image, "targets": targets})
    forward_ms, explain_ms = [], []
    for _ in range(runs):  # interleaved, so both see the same machine state
        start = time.perf_counter()
        plain.run(None, {"image": image})
        forward_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        explainer.run(None, {"image": image, "targets": targets})
        explain_ms.append((time.perf_counter() - start) * 1e3)
    forward, explain = statistics.median(forward_ms), statistics.median(explain_ms)
    return {"model": arch, "forward_ms": round(forward, 2), "explainer_ms": round(explain, 2),
            "ratio": round(explain / forward, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = [measure(arch, args.threads, args.runs, Path(scratch)) for arch in args.models]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"onnxruntime {ort.__version__}, {args.threads} intra-op threads"
    print(f"\nExplainer graph vs plain forward (CPU, B=1, 224², median of {args.runs}; "
          f"{machine})\n")
    print("| model | forward ms | explainer ms (Grad-CAM tensors) | ratio (goal <= 1.10) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['forward_ms']} | {r['explainer_ms']} | {r['ratio']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "graph_cost.json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                         indent=1))


if __name__ == "__main__":
    main()
