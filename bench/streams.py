"""Video streams: what a camera feed gets from ``camserve serve``.

``.venv/bin/python bench/streams.py [--models models] [--seconds 5] [--sizes 640x480 1920x1080]``

For each frame size, 1, 2 and 4 concurrent streams (one ``Client`` each) offer JPEG frames
(quality 90) of a pan-and-zoom clip over samples/cat.jpg at ``--fps`` (30) for ``--seconds``,
in two modes: explain every frame (the default stream) and latest frame wins
(``StreamOptions(latest_frame_wins=True)``). Per row: explained frames/s over all streams, the
latency of explained frames as the client sees it (frame offered -> its answer received) and
as the server reports it (arrival -> answer ready, ``StreamStats``; the worst stream's), and the
fraction of frames skipped. Explain-every-frame behind a slower server queues: its client-side
latency grows with the run; latest-frame-wins stays at about one explanation.

Beside them, the graph's own throughput: the explainer session alone (no decode, no CAM) at
batch 1, 2, 4 and 8 on the same preprocessed picture, in a separate process without torch
(design.md's benchmark traps), with the server's thread count.

The server is a subprocess (``camserve serve --device cpu --intra-op-threads N``); the clients
share the machine with it. Writes bench/results/streams.{md,json} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def graph_throughput(models: Path, threads: int, seconds: float = 2.0) -> dict:
    """Images/s of the explainer session at batch 1, 2, 4, 8 (this process: no torch)."""
    from camserve.explain.image import preprocess
    from camserve.server.runtime import load_models

    assert "torch" not in sys.modules
    model = next(iter(load_models(models, "cpu", threads).values()))
    photo = cv2.cvtColor(cv2.imread(str(ROOT / "samples" / "cat.jpg")), cv2.COLOR_BGR2RGB)
    image, _ = preprocess(photo, model.card.preprocessing)
    layers = [layer.name for layer in model.card.layers]
    rates = {}
    for batch in (1, 2, 4, 8):
        images = np.repeat(image, batch, axis=0)
        targets = np.full((batch, 1), -1, np.int64)
        for _ in range(3):
            model.run(images, targets, layers)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.run(images, targets, layers)
            runs += 1
        rates[batch] = batch * runs / (time.perf_counter() - started)
    best = max(rates, key=rates.get)
    return {"model": model.name, "images_per_s": rates, "best_batch": best,
            "best_images_per_s": rates[best], "torch_imported": "torch" in sys.modules}


def _frames(size: tuple[int, int], count: int = 60) -> list[bytes]:
    from camserve.client import load_image
    from camserve.client.video import pan_zoom_clip

    clip = pan_zoom_clip(load_image(ROOT / "samples" / "cat.jpg"), seconds=count / 30, fps=30,
                         size=size)
    return [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR),
                         [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for f in clip]


def _one_stream(target: str, frames: list[bytes], fps: float, seconds: float, lfw: bool,
                out: dict) -> None:
    from camserve.client import Client
    from camserve.client.options import StreamOptions

    count = int(fps * seconds)
    sent: dict[str, float] = {}

    def offered():
        start = time.perf_counter()
        for i in range(count):
            time.sleep(max(0.0, start + i / fps - time.perf_counter()))
            sent[str(i)] = time.perf_counter()
            yield frames[i % len(frames)]

    latencies, skipped = [], 0
    with Client(target, timeout=None) as client:
        call = client.explain_stream(offered(), stream=StreamOptions(latest_frame_wins=lfw))
        first = None
        for answer in call:
            now = time.perf_counter()
            first = first or sent["0"]
            if answer.skipped:
                skipped += 1
            else:
                latencies.append((now - sent[answer.request_id]) * 1e3)
        out.update(latencies=latencies, skipped=skipped, offered=count,
                   wall=time.perf_counter() - first, stats=call.stats)


def stream_load(target: str, frames: list[bytes], streams: int, fps: float, seconds: float,
                lfw: bool) -> dict:
    results = [{} for _ in range(streams)]
    threads = [threading.Thread(target=_one_stream,
                                args=(target, frames, fps, seconds, lfw, results[i]))
               for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies = np.concatenate([r["latencies"] for r in results])
    explained = len(latencies)
    offered = sum(r["offered"] for r in results)
    wall = max(r["wall"] for r in results)
    return {"streams": streams, "mode": "latest-frame-wins" if lfw else "every frame",
            "offered": offered, "explained": explained,
            "explained_per_s": explained / wall,
            "skipped_fraction": sum(r["skipped"] for r in results) / offered,
            "client_p50_ms": float(np.percentile(latencies, 50)),
            "client_p99_ms": float(np.percentile(latencies, 99)),
            "server_p50_ms": max(r["stats"]["latency_p50_ms"] for r in results),
            "server_p99_ms": max(r["stats"]["latency_p99_ms"] for r in results)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="per row")
    parser.add_argument("--fps", type=float, default=30.0, help="offered, per stream")
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1920x1080"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--graph-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.graph_only:
        print(json.dumps(graph_throughput(args.models, args.threads)))
        return

    graph = json.loads(subprocess.run(
        [sys.executable, __file__, "--graph-only", "--models", str(args.models),
         "--threads", str(args.threads)], capture_output=True, text=True, check=True
    ).stdout.strip().splitlines()[-1])

    from camserve.client import Client

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "camserve", "serve", "--models",
                               str(args.models), "--port", str(port), "--device", "cpu",
                               "--intra-op-threads", str(args.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        target = f"127.0.0.1:{port}"
        with Client(target, timeout=2) as client:
            if not client.wait_until_serving(120, lambda: server.poll() is None):
                sys.exit("the server did not come up")
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            frames = _frames((width, height))
            stream_load(target, frames, 1, args.fps, 1.0, False)  # warm-up
            for streams in args.streams:
                for lfw in (False, True):
                    row = stream_load(target, frames, streams, args.fps, args.seconds, lfw)
                    row["size"] = size
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(30)

    lines = [(f"Frames offered at {args.fps:g} fps per stream for {args.seconds:g} s; server "
             f"--device cpu --intra-op-threads {args.threads}; JPEG q90 frames."), "",
             ("| size | streams | mode | explained/s | skipped | client p50 / p99 ms | "
             "server p50 / p99 ms |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['streams']} | {r['mode']} | "
                     f"{r['explained_per_s']:.1f} | {r['skipped_fraction']:.0%} | "
                     f"{r['client_p50_ms']:.0f} / {r['client_p99_ms']:.0f} | "
                     f"{r['server_p50_ms']:.0f} / {r['server_p99_ms']:.0f} |")
    rates = ", ".join(f"B={b}: {v:.1f}" for b, v in graph["images_per_s"].items())
    lines += ["", (f"Graph alone ({graph['model']}, in-process, no torch, {args.threads} "
              f"threads), images/s: {rates}; best B={graph['best_batch']}: "
              f"{graph['best_images_per_s']:.1f}/s.")]
    table = "\n".join(lines)
    print(table)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "streams.md").write_text(table + "\n")
    (results / "streams.json").write_text(json.dumps({"rows": rows, "graph": graph}, indent=1))


if __name__ == "__main__":
    main()
