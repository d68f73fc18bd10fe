"""gRPC's own cost per call: grpcio's sync server against ``grpc.aio``, without camserve.

``make bench-transport`` (or ``.venv/bin/python bench/transport.py [--rounds 30]``).

The server that camserve runs is grpcio's sync server: a polling thread hands each call to a
thread pool, whose thread runs the handler. ``grpc.aio`` runs handlers as coroutines on one
event loop instead; work that blocks (onnxruntime, NumPy) then goes to an executor thread,
so a call still crosses a thread. This measures which of the two costs less per call, with
camserve's message sizes (a 35 KB JPEG in, a 100 KB response out: a float16 224x224 map)
and a handler that does ``--work-ms`` of work off the GIL (a sleep: the graph run holds no
GIL), so that what differs is the transport and its thread hand-offs alone.

Each server runs in its own process; one client process calls them in interleaved rounds,
``--burst`` calls in a row per server and round, each ``--pause-ms`` after the previous one,
and reports the median and p10-p90 of the calls after each burst's first, less the work
(what the transport adds). Writes bench/results/transport.md (also printed) and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frames import (  # bench/frames.py
    cpu_name,
    free_port,
    settings,
    summary,
    time_rounds,
    write_report,
)

ROOT = Path(__file__).resolve().parent.parent
REQUEST_BYTES = 35_000  # samples/cat.jpg
RESPONSE_BYTES = 100_500  # the SDK default's answer for Lite0
METHOD = "/bench.Transport/Call"
SERVERS = ("sync", "aio")


def serve_sync(port: int, work_s: float) -> None:
    """grpcio's sync server, as camserve builds it: a thread pool runs the handler."""
    answer = b"r" * RESPONSE_BYTES

    def call(request: bytes, context) -> bytes:
        time.sleep(work_s)
        return answer

    server = grpc.server(futures.ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Transport", {"Call": grpc.unary_unary_rpc_method_handler(call)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def serve_aio(port: int, work_s: float) -> None:
    """``grpc.aio``: the handler is a coroutine; the blocking work goes to an executor."""
    answer = b"r" * RESPONSE_BYTES

    def work() -> bytes:
        time.sleep(work_s)
        return answer

    async def call(request: bytes, context) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(None, work)

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Transport", {"Call": grpc.unary_unary_rpc_method_handler(call)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--burst", type=int, default=4)
    parser.add_argument("--pause-ms", type=float, default=20.0)
    parser.add_argument("--work-ms", type=float, nargs="+", default=[0.0, 7.0],
                        help="the handler's GIL-free work per call (7: a Lite0 graph run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        {"sync": serve_sync, "aio": serve_aio}[args.serve](args.port, args.work_ms[0] / 1e3)
        return

    request = b"q" * REQUEST_BYTES
    results: dict[str, dict] = {}
    for work_ms in args.work_ms:
        servers, calls = {}, {}
        try:
            for kind in SERVERS:
                port = free_port()
                servers[kind] = subprocess.Popen(
                    [sys.executable, __file__, "--serve", kind, "--port", str(port),
                     "--work-ms", str(work_ms)], stdout=subprocess.PIPE, text=True)
                if servers[kind].stdout.readline().strip() != "ready":
                    raise RuntimeError(f"the {kind} server did not start")
                channel = grpc.insecure_channel(f"127.0.0.1:{port}")
                stub = channel.unary_unary(METHOD)

                def call(stub=stub, work_ms=work_ms) -> float:
                    start = time.perf_counter()
                    stub(request, timeout=10)
                    return (time.perf_counter() - start) * 1e3 - work_ms
                calls[kind] = call
            times = time_rounds(calls, args.rounds, args.warmup, args.pause_ms / 1e3,
                                args.burst)
        finally:
            for process in servers.values():
                process.terminate()
                process.wait()
        results[f"{work_ms:g}"] = {kind: summary(times[kind]) for kind in SERVERS}

    lines = ["# gRPC per call: sync server vs grpc.aio", "",
             (f"{cpu_name()}; grpcio {grpc.__version__}, Python {sys.version.split()[0]}. "
              f"{REQUEST_BYTES} bytes in, {RESPONSE_BYTES} out; each server in its own "
              f"process; {args.rounds} interleaved rounds of {args.burst} calls per server, "
              f"{args.pause_ms:g} ms apart; ms per call less the handler's work, median and "
              "p10-p90 of the calls after each burst's first."), "",
             "| handler work (ms) | " + " | ".join(SERVERS) + " | aio / sync |",
             "|---|" + "---|" * (len(SERVERS) + 1)]
    for work_ms, by_kind in results.items():
        lines.append(f"| {work_ms} | " + " | ".join(
            f"{by_kind[k]['median']:.3f} ({by_kind[k]['p10']:.3f}-{by_kind[k]['p90']:.3f})"
            for k in SERVERS) + f" | {by_kind['aio']['median'] / by_kind['sync']['median']:.2f} |")
    write_report(args.out, "transport", "\n".join(lines) + "\n",
                 {"cpu": cpu_name(), "settings": settings(args), "results": results})


if __name__ == "__main__":
    main()
