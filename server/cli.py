"""``camserve serve``: serve every explainer graph in a folder over gRPC."""

from __future__ import annotations

import argparse
import logging

from camserve.server import config


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve explainer graphs over gRPC",
                              description="Serve every explainer graph in --models over gRPC "
                                          "(camserve.v1.Explainer, health, reflection). "
                                          "SIGTERM/SIGINT stop it gracefully, SIGHUP reloads "
                                          "the models folder.")
    config.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from camserve.server.app import serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve_forever(config.from_args(args))
    return 0
