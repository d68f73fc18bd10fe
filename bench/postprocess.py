"""Postprocessing alone: graph outputs -> maps -> the wire's ExplainResponse bytes.

``make bench-postprocess`` (or ``.venv/bin/python bench/postprocess.py [--calls 300]``).

One process, no server and no torch. The explainer graph (EfficientNet-Lite0 by default, 2
intra-op threads as the server runs it) runs once per case on samples/cat.jpg; then each
case's postprocessing is timed on those outputs, in its three parts:

    maps      ``Pipeline.finish``: Grad-CAM from activations and gradients, resized to the
              space asked for, and the scores (the server's ``postprocess`` stage)
    response  ``to_response``: the maps cast to the wire's dtype, the ExplainResponse built
    bytes     ``SerializeToString``: what gRPC then sends

two ways: back to back (``--calls`` in a row: code and data hot), and as the server meets
it: each call ``--pause-ms`` after the previous one and right after a graph run of the same
model (which fills the caches with its own weights and activations). The issue's targets
(one-layer Grad-CAM at feature-map size <= 0.1 ms, at model input <= 0.3 ms) are read on
maps + response + bytes. Writes bench/results/postprocess.md (also printed) and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frames import MODEL, SAMPLE, machine, settings, summary, write_report  # bench/frames.py

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("maps", "response", "bytes")
# the targets (ms) on maps + response + bytes, per space
TARGETS = {"FEATURE_MAP": 0.1, "MODEL_INPUT": 0.3}


def cases(pb) -> list[tuple[str, object]]:
    """(label, OutputOptions): the SDK's default first (model input, float16)."""
    out = pb.OutputOptions
    return [("MODEL_INPUT float16 (SDK default)", out(space=pb.MODEL_INPUT, dtype=pb.FLOAT16)),
            ("MODEL_INPUT float32", out(space=pb.MODEL_INPUT, dtype=pb.FLOAT32)),
            ("MODEL_INPUT uint8", out(space=pb.MODEL_INPUT, dtype=pb.UINT8)),
            ("FEATURE_MAP float32", out(space=pb.FEATURE_MAP, dtype=pb.FLOAT32)),
            ("ORIGINAL_IMAGE float16", out(space=pb.ORIGINAL_IMAGE, dtype=pb.FLOAT16))]


def timed_parts(pipeline, model, request, job, outputs, to_response) -> Callable[[], tuple]:
    """One postprocessing, its parts' times (ms) in the order of ``PARTS``."""
    def call() -> tuple[float, float, float]:
        job.inferred = start = time.perf_counter_ns()
        explained = pipeline.finish(request, model, job, outputs)
        built = time.perf_counter_ns()
        response = to_response(explained, request)
        encoded = time.perf_counter_ns()
        response.SerializeToString()
        done = time.perf_counter_ns()
        return tuple((b - a) / 1e6 for a, b in ((start, built), (built, encoded),
                                                 (encoded, done)))
    return call


def measure(args: argparse.Namespace) -> list[dict]:
    from camserve.explain.pipeline import Pipeline
    from camserve.explain.response import to_response
    from camserve.server.runtime import load_model
    from camserve.v1 import explainer_pb2 as pb

    model = load_model(args.model, "cpu", args.threads)
    pipeline = Pipeline()
    jpeg = SAMPLE.read_bytes()
    rows = []
    for label, output in cases(pb):
        request = pb.ExplainRequest(encoded=jpeg, output=output)
        job = pipeline.prepare(request, model)
        outputs = model.run(job.image, job.targets[None, :], job.layers)
        call = timed_parts(pipeline, model, request, job, outputs, to_response)
        for _ in range(20):  # warm-up
            call()
        hot = [call() for _ in range(args.calls)]
        served = []
        for _ in range(args.calls // 3):
            time.sleep(args.pause_ms / 1e3)
            model.run(job.image, job.targets[None, :], job.layers)
            served.append(call())
        rows.append({"case": label, "space": label.split()[0],
                     "hot": _parts(hot), "after_graph_run": _parts(served),
                     "response_bytes": to_response(pipeline.finish(request, model, job, outputs),
                                                   request).ByteSize()})
        print(f"{label} done", flush=True)
    return rows


def _parts(calls: list[tuple[float, ...]]) -> dict[str, dict]:
    """Summaries of each part and of their sum (ms)."""
    parts = {name: summary([c[i] for c in calls]) for i, name in enumerate(PARTS)}
    parts["total"] = summary([sum(c) for c in calls])
    return parts


def report(rows: list[dict], info: dict, args: argparse.Namespace) -> str:
    about = (f"{info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}, "
             f"OpenCV {info['opencv']}, NumPy {info['numpy']}. Model {args.model.name}, "
             "samples/cat.jpg, the predicted class, Grad-CAM on the model's layer. Medians "
             f"(p10-p90) in ms of {args.calls} calls back to back (hot) and of "
             f"{args.calls // 3} calls each {args.pause_ms:g} ms after the previous and "
             "right after a graph run (as the server meets them). maps: Pipeline.finish "
             "(the server's postprocess stage); response: to_response; bytes: "
             "SerializeToString.")
    header = ("| case | maps (hot) | response (hot) | bytes (hot) | total (hot) | total after a "
              "graph run | target | response bytes |")
    lines = ["# Postprocessing: graph outputs to response bytes", "", about, "", header,
             "|---|---|---|---|---|---|---|---|"]

    def cell(s: dict) -> str:
        return f"{s['median']:.3f} ({s['p10']:.3f}-{s['p90']:.3f})"

    for row in rows:
        hot, served = row["hot"], row["after_graph_run"]
        target = TARGETS.get(row["space"])
        mark = "" if target is None else \
            f"≤ {target:g} {'✓' if hot['total']['median'] <= target else '✗'}"
        lines.append(f"| {row['case']} | {cell(hot['maps'])} | {cell(hot['response'])} | "
                     f"{cell(hot['bytes'])} | {cell(hot['total'])} | {cell(served['total'])} "
                     f"| {mark} | {row['response_bytes']:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--calls", type=int, default=300, help="timed calls back to back")
    parser.add_argument("--pause-ms", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not args.model.exists():
        sys.exit(f"postprocess bench: {args.model} does not exist; run `make export` first")
    info = machine(args.threads)
    rows = measure(args)
    text = report(rows, info, args)
    write_report(args.out, "postprocess", text,
                 {"settings": settings(args), "machine": info, "cases": rows})


if __name__ == "__main__":
    main()
