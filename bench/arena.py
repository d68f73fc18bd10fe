"""onnxruntime's CPU memory arena on and off: graph time by batch size, and memory kept.

``make bench-arena`` (or ``.venv/bin/python bench/arena.py [--model FILE] [--batches 1 4 16]
[--rounds 5] [--threads 2]``).

The server opens its sessions with the process's shared arena unless told
``--no-cpu-arena``: the arena keeps every byte it took, which the memory budget then counts
as held (at most half of it). This measures what turning it off costs, with glibc's malloc
set as the server sets it (``return_freed_memory``: large blocks go back to the system when
freed) and with glibc's defaults. Each (setting, batch size) runs in a process of its own,
without torch, with ``camserve.server.runtime.session_options`` (the server's own settings):
the explainer graph on the same seeded input on every side, 3 warm-up runs, then ``--runs``
timed runs; the rounds alternate the settings. It prints the median over rounds of each
process's median run time, and the resident memory once the runs are over (what the
process keeps) and at its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
# name -> (onnxruntime's CPU arena, glibc's malloc set as the server sets it when it has a
# memory budget, i.e. by default: blocks from 1 MiB on mapped and unmapped on free)
SETTINGS = {"arena on (default)": (True, True),
            "arena off (--no-cpu-arena)": (False, True),
            "arena off, glibc's malloc defaults": (False, False)}


def measure(model: Path, batch: int, runs: int, threads: int, arena: bool,
            malloc_as_server: bool) -> dict:
    """In this process: median ms of ``runs`` graph runs at ``batch``, RSS after and peak."""
    import numpy as np
    import onnxruntime as ort

    from camserve.server.lifecycle import return_freed_memory
    from camserve.server.runtime import session_options

    if malloc_as_server:
        return_freed_memory()
    session = ort.InferenceSession(str(model), session_options(threads, arena),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in session.get_inputs():  # image [B,3,H,W] float32, targets [B,K] int64
        shape = [batch if i == 0 else (d if isinstance(d, int) else 1)
                 for i, d in enumerate(spec.shape)]
        feeds[spec.name] = (rng.standard_normal(shape).astype(np.float32)
                            if "float" in spec.type else np.full(shape, -1, np.int64))
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    kib = {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}
    return {"ms": 1000 * statistics.median(times), "rss_mib": kib["VmRSS"] / 1024,
            "peak_mib": kib["VmHWM"] / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("BATCH", "SETTING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        arena, malloc_as_server = SETTINGS[args.worker[1]]
        print(json.dumps(measure(args.model, int(args.worker[0]), args.runs, args.threads,
                                 arena, malloc_as_server)))
        return 0
    if not args.model.is_file():
        print(f"error: {args.model} does not exist; run 'make export' first", file=sys.stderr)
        return 2
    results: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.rounds):
        for batch in args.batches:
            for name in SETTINGS:
                out = subprocess.run(
                    [sys.executable, __file__, "--model", str(args.model), "--runs",
                     str(args.runs), "--threads", str(args.threads), "--worker", str(batch),
                     name], capture_output=True, text=True, check=True)
                results.setdefault((batch, name), []).append(json.loads(out.stdout))
    print(f"{args.model.name}, {args.threads} threads, load avg {os.getloadavg()[0]:.2f}; "
          f"medians of {args.rounds} processes x {args.runs} runs")
    print("| batch | setting | graph ms | ms per image | RSS kept MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for (batch, name), rows in results.items():
        ms = statistics.median(r["ms"] for r in rows)
        print(f"| {batch} | {name} | {ms:.1f} | {ms / batch:.2f} | "
              f"{statistics.median(r['rss_mib'] for r in rows):.0f} | "
              f"{statistics.median(r['peak_mib'] for r in rows):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
