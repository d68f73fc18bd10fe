"""``camserve serve``: serve every explainer graph in a folder over gRPC."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve explainer graphs over gRPC",
                              description="Serve every explainer graph in --models over gRPC "
                                          "(camserve.v1.Explainer, health, reflection). "
                                          "SIGTERM/SIGINT stop it gracefully, SIGHUP reloads "
                                          "the models folder.")
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
    tls = p.add_argument_group("security")
    tls.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="PEM certificate (chain) of the server; with --tls-key, serve TLS only")
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    tls.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                     help="PEM CA certificate(s): require client certificates it signed "
                          "(mutual TLS)")
    tls.add_argument("--auth-token-file", type=Path, metavar="FILE",
                     help="file holding one bearer token; every call but health and reflection "
                          "must send metadata 'authorization: Bearer <token>'")
    p.add_argument("--workers", type=int, default=16,
                   help="calls answered at once (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="calls waiting for a worker; more are refused with RESOURCE_EXHAUSTED "
                        "at once (default 64)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (same host)")
    p.add_argument("--health-port", type=int, default=None,
                   help="also serve grpc.health.v1 alone on this port (same host, plaintext, "
                        "threads of its own): probes there are answered even when the main "
                        "port is saturated and refuses calls")
    p.add_argument("--grace-seconds", type=float, default=10.0,
                   help="on SIGTERM/SIGINT: how long calls in flight may take to finish "
                        "(default 10); SIGHUP reloads the models folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from camserve.server.app import ServerConfig, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve_forever(ServerConfig(models=args.models, host=args.host, port=args.port,
                               device=args.device, intra_op_threads=args.intra_op_threads,
                               default_model=args.default_model,
                               batching=not args.no_batching,
                               max_batch_size=args.max_batch_size,
                               max_queue_delay_ms=args.max_queue_delay_ms,
                               tls_cert=args.tls_cert, tls_key=args.tls_key,
                               tls_client_ca=args.tls_client_ca,
                               auth_token_file=args.auth_token_file,
                               grace_seconds=args.grace_seconds, workers=args.workers,
                               max_queue=args.max_queue, metrics_port=args.metrics_port,
                               health_port=args.health_port))
    return 0
