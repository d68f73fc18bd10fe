"""``camserve serve``: serve every explainer graph in a folder over gRPC."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve explainer graphs over gRPC",
                              description="Serve every explainer graph in --models over gRPC "
                                          "(camserve.v1.Explainer, health, reflection).")
    p.add_argument("--models", type=Path, default=Path("models"), help="models folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--intra-op-threads", type=int, default=None,
                   help="onnxruntime threads per inference (default: onnxruntime's choice)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="dynamic batching: most requests per graph run (default 8)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0,
                   help="dynamic batching: longest wait for a batch to fill (default 2 ms)")
    p.add_argument("--no-batching", action="store_true",
                   help="run every request on its own")
    p.add_argument("--default-model", help="model for requests that name none "
                                            "(default: first by name)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from camserve.server.app import ServerConfig, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve_forever(ServerConfig(models=args.models, host=args.host, port=args.port,
                               device=args.device, intra_op_threads=args.intra_op_threads,
                               default_model=args.default_model,
                               batching=not args.no_batching,
                               max_batch_size=args.max_batch_size,
                               max_queue_delay_ms=args.max_queue_delay_ms))
    return 0
